"""Fixtures for shim unit tests: a capture 'containerd' Events server, a TaskService with the
host test backend served by the real ttrpc Server over a socketpair, and bundle helpers."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from common.errors import to_status
from proto.containerd.services.events import ttrpc_pb2 as evsvc_pb2
from proto.containerd.task.v2 import shim_pb2
from shim.events import EventPublisher
from shim.task_service import TaskService
from tests.fakes.event_sink import EventSink
from tests.fakes.host_process_backend import HostProcessBackend
from ttrpc import Client, Server

TASK = "containerd.task.v2.Task"


@pytest.fixture
async def event_sink(tmp_path: Path) -> AsyncIterator[tuple[EventSink, str]]:
    sink = EventSink()
    server = Server()
    server.register_service(evsvc_pb2.DESCRIPTOR.services_by_name["Events"], sink)
    path = str(tmp_path / "ctd.sock.ttrpc")
    await server.start_unix(path)
    yield sink, path
    await server.close()


def write_bundle(root: Path, name: str, args: list[str], annotations: dict[str, str] | None = None
                 ) -> Path:
    bundle = root / name
    bundle.mkdir(parents=True, exist_ok=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": args, "env": ["PATH=/usr/bin:/bin"],
                                                "cwd": "/"},
            "annotations": annotations or {}}
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

    async def create(self, cid: str, args: list[str], **kw: Any) -> shim_pb2.CreateTaskResponse:
        b = self.bundle(cid, args)
        out = self.tmp / f"{cid}.out"
        req = shim_pb2.CreateTaskRequest(id=cid, bundle=str(b), stdout=f"file://{out}", **kw)
        return await self.call("Create", req, shim_pb2.CreateTaskResponse)

    def output(self, cid: str) -> str:
        p = self.tmp / f"{cid}.out"
        return p.read_text() if p.exists() else ""


@pytest.fixture
async def shim(tmp_path: Path, event_sink: tuple[EventSink, str]) -> AsyncIterator[ShimHarness]:
    sink, path = event_sink
    publisher = EventPublisher(path, "testns", backoff=0.01)
    publisher.start()
    shutdowns: list[int] = []
    service = TaskService(namespace="testns", sandbox_id="sb", backend_factory=HostProcessBackend,
                          publisher=publisher, state_root=str(tmp_path / "state"),
                          on_shutdown=lambda: shutdowns.append(1))
    server = Server(status_of=to_status)
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sreader, swriter = await asyncio.open_unix_connection(sock=a)
    serve = asyncio.ensure_future(server.serve_connection(sreader, swriter))
    creader, cwriter = await asyncio.open_unix_connection(sock=b)
    client = Client(creader, cwriter)
    h = ShimHarness(service, client, sink, tmp_path, shutdowns, server)
    yield h
    for c in service.table.containers():  # kill leftovers of a failed test
        backend = service._backend
        if backend is not None:
            with contextlib.suppress(Exception):
                await backend.delete(c.id, "")
    await client.close()
    serve.cancel()
    with contextlib.suppress(BaseException):
        await serve
    await publisher.close(timeout=1)
