"""Carry out a memory policy's :class:`~resourced.policies.memory.ResizeMemory`: PUT /colo/memory
on the sandbox's shim management socket and wait for the size reached (the shim bounds the resize
by its ``[colo.memory] resize_timeout``; ``timeout`` here only bounds waiting for its answer).

:func:`resize` never raises for a refused or failed resize: it returns an :class:`Outcome` whose
``result`` is one of ``ok``, ``timeout`` (the guest did not follow: the VM keeps what it reached),
``refused`` (400: under the floor or over the maximum, with the limits), ``failed`` (the shim is
gone, 409, no answer) or ``dry_run``; ``target`` is the sandbox's target afterwards when the shim
said (the policy then knows it set it), else None.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import KataColoError
from resourced.policies.memory import ResizeMemory
from shim.mgmt import client

MIB = 1 << 20


@dataclass(frozen=True)
class Outcome:
    result: str
    target: int | None
    actual: int | None
    message: str


def _size(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


async def resize(root: str, action: ResizeMemory, dry_run: bool, timeout: float = 300.0) -> Outcome:
    sid, want = action.sandbox_id, action.target_bytes
    if dry_run:
        return Outcome("dry_run", None, None, f"would resize {sid[:12]} to {want // MIB} MiB")
    async with client.ShimClient(client.socket_of(sid, root), timeout=timeout, sandbox_id=sid) as c:
        try:
            doc = await c.json("PUT", "/colo/memory", {"target": want})
        except client.ShimError as exc:
            body = exc.body or {}
            if exc.status == 503 and body.get("timed_out"):
                actual = _size(body.get("actual_bytes"))
                return Outcome("timeout", actual, actual, f"{sid[:12]}: {exc.reason}")
            if exc.status == 400:
                return Outcome("refused", None, None, f"{sid[:12]}: refused: {exc.reason}")
            return Outcome("failed", None, None, f"{sid[:12]}: {exc}")
        except KataColoError as exc:
            return Outcome("failed", None, None, f"{sid[:12]}: {exc}")
    if not isinstance(doc, dict):
        return Outcome("failed", None, None, f"{sid[:12]}: not a resize result: {str(doc)[:80]}")
    target, actual = _size(doc.get("target_bytes")), _size(doc.get("actual_bytes"))
    seconds = doc.get("seconds")
    took = f" in {seconds:.2f}s" if isinstance(seconds, (int, float)) else ""
    return Outcome("ok", target, actual, f"{sid[:12]}: {(actual or 0) // MIB} MiB reached{took}")
