"""Memory elasticity on the management socket: the routes and the ``kata_colo_memory_*`` families.

=======  ==================  ====================================================================
GET      /colo/memory        the memory state from the VMM and the last guest numbers (the guest
                             is not asked: the node policy polls this), with ``vmm_pid``
GET      /colo/memory?fresh  the same with the limits from the guest's memory asked now (bounded)
PUT      /colo/memory        ``{"target": bytes}`` (or a size string, ``"1536M"``) → the size reached
=======  ==================  ====================================================================

PUT answers 200 ``{"target_bytes", "actual_bytes", "floor_bytes", "max_bytes", "seconds",
"mechanisms", "steps", "timed_out": false}``; a target under the floor or over the maximum 400
``{"error", "status", "target_bytes", "floor_bytes", "max_bytes"}`` with nothing changed; a guest
that does not follow within ``[colo.memory] resize_timeout`` 503 ``{"error", "status",
"target_bytes", "actual_bytes", "timed_out": true}`` (the VM keeps running with what it reached);
no memory control 409 (the common contract of :mod:`shim.mgmt.admin`).
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from common.errors import DeadlineExceeded, InvalidArgument
from common.prom_text import Family, labelled
from shim.mgmt.sizes import parse_size

VIEW_TIMEOUT = 2.0
#: the answer waits for the resize's own deadline plus this (the resize bounds itself)
ANSWER_GRACE = 15.0


def _target(doc: dict[str, Any]) -> int:
    unknown = sorted(set(doc) - {"target"})
    if unknown:
        raise InvalidArgument(f"unknown key(s) {unknown}; allowed: ['target']")
    if "target" not in doc:
        raise InvalidArgument("missing key(s) ['target']")
    value = doc["target"]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument("target must be a number of bytes (or a size like \"1536M\")")
    return parse_size(value)


class MemoryRoutes:
    """Handlers over the admin's sandbox (``running()`` raises 409 when there is no VM)."""

    def __init__(self, running: Any, read_json: Any) -> None:
        self._running = running
        self._read_json = read_json

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/colo/memory", self.get_memory, allow_head=False),
                web.put("/colo/memory", self.put_memory)]

    async def get_memory(self, request: web.Request) -> web.StreamResponse:
        sb = self._running()
        fresh = request.query.get("fresh", "0").lower() not in ("0", "false", "no", "")
        try:
            if fresh:
                doc = await asyncio.wait_for(sb.memory_limits(), VIEW_TIMEOUT + 5.0)
            else:
                doc = await asyncio.wait_for(sb.memory_view(), VIEW_TIMEOUT)
        except TimeoutError:
            raise DeadlineExceeded("memory: no answer from the VM in time") from None
        doc["vmm_pid"] = sb.vmm_pid()
        return web.json_response(doc)

    async def put_memory(self, request: web.Request) -> web.StreamResponse:
        from shim.resources.memory import MemoryLimitError, MemoryTimeout

        target = _target(await self._read_json(request))
        sb = self._running()
        timeout = float(sb.cfg.colo.memory.resize_timeout) + ANSWER_GRACE if sb.cfg is not None else 60.0
        task = asyncio.ensure_future(sb.set_memory(target))
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout)
        except MemoryLimitError as exc:
            lim = exc.limits
            return web.json_response({"error": str(exc), "status": 400, "target_bytes": exc.target,
                                      "floor_bytes": lim.floor, "max_bytes": lim.max}, status=400)
        except MemoryTimeout as exc:
            return web.json_response({"error": str(exc), "status": 503, "target_bytes": exc.target,
                                      "actual_bytes": exc.actual, "timed_out": True}, status=503)
        except TimeoutError:
            raise DeadlineExceeded(f"memory: no answer within {timeout:.0f}s (the resize continues "
                                   f"in the background)") from None
        return web.json_response(result.to_dict())


def families(view: dict[str, Any] | None) -> list[Family]:
    """``kata_colo_memory_bytes{item}``, ``kata_colo_memory_resizes_total{result}`` and
    ``kata_colo_memory_last_resize_seconds`` from the memory resource's view."""
    if not view:
        return []
    items = [(name, view.get(f"{name}_bytes")) for name in
             ("target", "actual", "floor", "max", "boot", "plugged", "ballooned")]
    guest = view.get("guest") or {}
    items += [("guest_available", guest.get("available_bytes")), ("guest_used", guest.get("used_bytes")),
              ("guest_total", guest.get("total_bytes"))]
    fams = [labelled("kata_colo_memory_bytes", "The VM's memory: the target, what it has (actual), the "
                     "floor no shrink goes under, the maximum, and the guest's view.", "item",
                     [(k, float(v)) for k, v in items if isinstance(v, int)]),
            labelled("kata_colo_memory_resizes_total", "Memory resizes by result (ok, timeout, refused, "
                     "failed).", "result", [(k, float(v)) for k, v in sorted((view.get("resizes") or {}).items())],
                     "counter")]
    last = view.get("last")
    if isinstance(last, dict) and isinstance(last.get("seconds"), (int, float)):
        fam = Family("kata_colo_memory_last_resize_seconds", "Duration of the last memory resize.")
        fam.add(float(last["seconds"]))
        fams.append(fam)
    return fams
