"""The management socket's routes (aiohttp handlers) and their error contract.

=======  ==============================  ==================================================
GET      /metrics                        Prometheus text (:mod:`shim.mgmt.metrics`)
GET      /agent-url                      the agent's address, e.g. ``unix:///…/agent.sock``
GET      /colo/sandbox                   JSON (:mod:`shim.mgmt.view`)
PUT      /colo/vcpus/{n}/priority        ``{"priority": "low"}`` → the new {priority: [vCPUs]}
PUT      /colo/priorities/{name}/knobs   ``{"cpu_shares": 64, ...}`` → the knobs in force
POST     /colo/exec                      ``{"argv": [...], "stdin": b64, "timeout": s, "env": []}``
GET/PUT  /colo/memory                    ``{"target": bytes}`` → the size reached (:mod:`shim.mgmt.memory`)
=======  ==============================  ==================================================

Errors are JSON ``{"error": reason, "status": code}``: unknown route 404, wrong method 405,
malformed JSON / unknown key / out-of-range value 400, a peer that is not an admin 403 (and
``/colo/exec`` while ``[agent.kata] debug_console_enabled`` is false), a body over 1 MiB 413, a
sandbox without a running VM or without priorities 409, a guest that does not answer within
:data:`GUEST_TIMEOUT` 503 (a change already under way continues in the background). Handlers never
block the event loop the Task API shares (host file work runs in worker threads).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

from aiohttp import web

from common.errors import (
    Code,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KataColoError,
    PermissionDenied,
)
from common.prom_text import CONTENT_TYPE
from shim.mgmt import view as viewmod
from shim.mgmt.memory import MemoryRoutes
from shim.mgmt.metrics import ShimMetrics

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
GUEST_TIMEOUT = 10.0
STATUS_OF = {Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409,
             Code.FAILED_PRECONDITION: 409, Code.PERMISSION_DENIED: 403, Code.UNIMPLEMENTED: 501,
             Code.DEADLINE_EXCEEDED: 503, Code.UNAVAILABLE: 503, Code.RESOURCE_EXHAUSTED: 503,
             Code.CANCELLED: 503}


def http_error(exc: KataColoError) -> web.HTTPException:
    status = STATUS_OF.get(exc.code, 500)
    cls = {400: web.HTTPBadRequest, 403: web.HTTPForbidden, 404: web.HTTPNotFound, 409: web.HTTPConflict,
           501: web.HTTPNotImplemented, 503: web.HTTPServiceUnavailable}.get(status, web.HTTPInternalServerError)
    return cls(reason=_one_line(str(exc)))


def _one_line(text: str, limit: int = 900) -> str:
    return " ".join(text.split())[:limit] or "error"


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error as JSON; KataColoError mapped by code; anything else a logged 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason, "status": exc.status}, status=exc.status,
                                 headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except KataColoError as exc:
        err = http_error(exc)
        return web.json_response({"error": err.reason, "status": err.status}, status=err.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug must not take the socket down
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": _one_line(f"{type(exc).__name__}: {exc}"), "status": 500}, status=500)


async def read_json(request: web.Request) -> dict[str, Any]:
    body = await request.read()  # aiohttp answers 413 past client_max_size
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"malformed JSON body: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the body must be a JSON object")
    return doc


def only_keys(doc: dict[str, Any], allowed: set[str], required: frozenset[str] | set[str] = frozenset()) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(doc))
    if missing:
        raise InvalidArgument(f"missing key(s) {missing}")


async def guest_bounded(coro: Any, what: str) -> Any:
    """Await a change that involves the guest; 503 after GUEST_TIMEOUT (it goes on regardless)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.wait_for(asyncio.shield(task), GUEST_TIMEOUT)
    except TimeoutError:
        raise DeadlineExceeded(f"{what}: the guest did not answer within {GUEST_TIMEOUT:.0f}s "
                               f"(the change continues in the background)") from None


class Admin:
    """Route handlers over one shim's sandbox handle (None for a backend without a VM)."""

    def __init__(self, sandbox_id: str, sandbox: Any | None, table: Any, metrics: ShimMetrics,
                 debug_console_enabled: bool) -> None:
        self.sandbox_id = sandbox_id
        self.sandbox = sandbox
        self.table = table
        self.metrics = metrics
        self.debug_console_enabled = debug_console_enabled

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self.get_metrics, allow_head=False),
                web.get("/agent-url", self.get_agent_url, allow_head=False),
                web.get("/colo/sandbox", self.get_sandbox, allow_head=False),
                web.put("/colo/vcpus/{vcpu}/priority", self.put_vcpu_priority),
                web.put("/colo/priorities/{name}/knobs", self.put_knobs),
                web.post("/colo/exec", self.post_exec),
                *MemoryRoutes(self._running, read_json).routes()]

    def _sandbox(self) -> Any:
        if self.sandbox is None:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} has no VM (this shim's backend runs none)")
        return self.sandbox

    def _running(self) -> Any:
        sb = self._sandbox()
        if not sb.running:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} VM is {sb.state.value}, not running")
        return sb

    async def get_metrics(self, request: web.Request) -> web.StreamResponse:
        text = await self.metrics.render()
        resp = web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp.enable_compression()
        return resp

    async def get_agent_url(self, request: web.Request) -> web.StreamResponse:
        sb = self._sandbox()
        if sb.hv is None:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} VM is {sb.state.value}")
        from agent_api.client.convert import agent_url

        return web.Response(text=agent_url(sb.hv.agent_address()))

    async def get_sandbox(self, request: web.Request) -> web.StreamResponse:
        vcpus = await self.metrics._vcpu_view() if self.sandbox is not None else None
        doc = await viewmod.sandbox_document(self.sandbox_id, self.sandbox, self.table, vcpus, self.metrics.overhead)
        return web.json_response(doc)

    async def put_vcpu_priority(self, request: web.Request) -> web.StreamResponse:
        text = request.match_info["vcpu"]
        if not text.isdigit() or len(text) > 4:
            raise InvalidArgument(f"vCPU must be a non-negative integer, not {text[:32]!r}")
        doc = await read_json(request)
        only_keys(doc, {"priority"}, {"priority"})
        prio = doc["priority"]
        if not isinstance(prio, str):
            raise InvalidArgument("priority must be a string")
        sb = self._running()
        mapping = await guest_bounded(sb.set_vcpu_priority(int(text), prio),
                                      f"vCPU {text} → priority {prio}")
        return web.json_response({"vcpu": int(text), "priority": prio, "mapping": mapping})

    async def put_knobs(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        doc = await read_json(request)
        if not doc:
            raise InvalidArgument("no knobs given")
        sb = self._running()
        try:
            await guest_bounded(sb.update_priority_knobs(name, doc), f"knobs of {name}")
        except ConfigError as exc:  # unknown key, wrong type, out of range: the model says which
            raise InvalidArgument(str(exc).removeprefix("invalid configuration: ")) from None
        config = sb.resource("qos").manager.config.priority(name)
        return web.json_response({"priority": name, "knobs": viewmod._knobs(config.knobs), "pin": config.pin})

    async def post_exec(self, request: web.Request) -> web.StreamResponse:
        if not self.debug_console_enabled:
            raise PermissionDenied("exec is disabled: set [agent.kata] debug_console_enabled = true "
                                   "(it also takes a new sandbox: the guest serves it from boot)")
        doc = await read_json(request)
        only_keys(doc, {"argv", "stdin", "timeout", "env"}, {"argv"})
        argv, env, timeout = doc["argv"], doc.get("env", []), doc.get("timeout", 30)
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidArgument("argv must be a non-empty list of strings")
        if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
            raise InvalidArgument("env must be a list of KEY=VALUE strings")
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 300:
            raise InvalidArgument("timeout must be an integer number of seconds in 1..300")
        try:
            stdin = base64.b64decode(doc.get("stdin") or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidArgument("stdin must be base64") from None
        agent = self._running().require_agent()
        resp = await agent.client.debug_exec(argv, stdin=stdin, timeout=timeout, env=env)
        return web.json_response({"exit_code": resp.exit_code,
                                  "stdout": base64.b64encode(resp.stdout).decode(),
                                  "stderr": base64.b64encode(resp.stderr).decode(),
                                  "stdout_truncated": resp.stdout_truncated,
                                  "stderr_truncated": resp.stderr_truncated})


def application(admin: Admin, middlewares: list[Any]) -> web.Application:
    app = web.Application(middlewares=[json_errors, *middlewares], client_max_size=MAX_BODY)
    app.add_routes(admin.routes())
    return app
