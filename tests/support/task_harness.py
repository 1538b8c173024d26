"""A TaskService served by the real ttrpc Server over a socketpair, with a capture "containerd"
Events server (:class:`tests.fakes.event_sink.EventSink`) receiving what it publishes.

``async with task_harness(tmp, backend_factory) as h`` (or the ``shim`` fixture of
tests/unit/shim/conftest.py, which uses the host test backend): ``h.call(method, req, resp)``
goes through the wire, so status mapping, event order and persistence are the product's.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

from common.errors import to_status
from proto.containerd.services.events import ttrpc_pb2 as evsvc_pb2
from proto.containerd.task.v2 import shim_pb2
from shim.backend import BackendFactory
from shim.events import EventPublisher
from shim.task_service import TaskService
from tests.fakes.event_sink import EventSink
from ttrpc import Client, Server

TASK = "containerd.task.v2.Task"


@contextlib.asynccontextmanager
async def event_sink_server(path: str) -> AsyncIterator[EventSink]:
    sink = EventSink()
    server = Server()
    server.register_service(evsvc_pb2.DESCRIPTOR.services_by_name["Events"], sink)
    await server.start_unix(path)
    try:
        yield sink
    finally:
        await server.close()


def write_bundle(root: Path, name: str, args: list[str], annotations: dict[str, str] | None = None,
                 **spec_extra: Any) -> Path:
    bundle = root / name
    bundle.mkdir(parents=True, exist_ok=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": args, "env": ["PATH=/usr/bin:/bin"],
                                                "cwd": "/"},
            "annotations": annotations or {}, **spec_extra}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


@dataclass
class ShimHarness:
    service: TaskService
    client: Client
    sink: EventSink
    tmp: Path
    shutdowns: list[int] = field(default_factory=list)
    server: Server | None = None

    async def call(self, method: str, req: Any, resp_type: Any = empty_pb2.Empty,
                   timeout: float | None = 10) -> Any:
        return await self.client.call(TASK, method, req, resp_type, timeout=timeout)

    def bundle(self, name: str, args: list[str], **kw: Any) -> Path:
        return write_bundle(self.tmp / "bundles", name, args, **kw)

    async def create(self, cid: str, args: list[str], *, bundle_kw: dict[str, Any] | None = None,
                     **kw: Any) -> shim_pb2.CreateTaskResponse:
        b = self.bundle(cid, args, **(bundle_kw or {}))
        out = self.tmp / f"{cid}.out"
        req = shim_pb2.CreateTaskRequest(id=cid, bundle=str(b), stdout=f"file://{out}", **kw)
        return await self.call("Create", req, shim_pb2.CreateTaskResponse)

    def output(self, cid: str) -> str:
        p = self.tmp / f"{cid}.out"
        return p.read_text() if p.exists() else ""


@contextlib.asynccontextmanager
async def task_harness(tmp: Path, backend_factory: BackendFactory, *, sandbox_id: str = "sb",
                       config_path: str = "") -> AsyncIterator[ShimHarness]:
    async with event_sink_server(str(tmp / "ctd.sock.ttrpc")) as sink:
        publisher = EventPublisher(str(tmp / "ctd.sock.ttrpc"), "testns", backoff=0.01)
        publisher.start()
        shutdowns: list[int] = []
        service = TaskService(namespace="testns", sandbox_id=sandbox_id, backend_factory=backend_factory,
                              publisher=publisher, state_root=str(tmp / "state"), config_path=config_path,
                              on_shutdown=lambda: shutdowns.append(1))
        server = Server(status_of=to_status)
        server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sreader, swriter = await asyncio.open_unix_connection(sock=a)
        serve = asyncio.ensure_future(server.serve_connection(sreader, swriter))
        creader, cwriter = await asyncio.open_unix_connection(sock=b)
        client = Client(creader, cwriter)
        h = ShimHarness(service, client, sink, tmp, shutdowns, server)
        try:
            yield h
        finally:
            for c in service.table.containers():  # kill leftovers of a failed test
                with contextlib.suppress(Exception):
                    await service.backend.delete(c.id, "")
            await client.close()
            serve.cancel()
            with contextlib.suppress(BaseException):
                await serve
            await publisher.close(timeout=1)
