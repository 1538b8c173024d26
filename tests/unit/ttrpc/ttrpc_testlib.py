"""Shared helpers of the ttrpc unit tests (a Task service implementation, raw frame I/O)."""
from __future__ import annotations

import asyncio

from google.protobuf import empty_pb2

from common import errors
from proto.containerd.task.v2 import shim_pb2
from proto.ttrpc import ttrpc_pb2
from ttrpc import ServerContext, framing

SVC = "containerd.task.v2.Task"
TASK = shim_pb2.DESCRIPTOR.services_by_name["Task"]


class TaskImpl:
    """Part of containerd.task.v2.Task: enough to exercise blocking, failing and slow calls."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.wait_started = asyncio.Event()
        self.cancelled: list[str] = []
        self.contexts: list[ServerContext] = []

    async def State(self, req: shim_pb2.StateRequest, ctx: ServerContext) -> shim_pb2.StateResponse:
        self.contexts.append(ctx)
        return shim_pb2.StateResponse(id=req.id, exec_id=req.exec_id, pid=42, status=2)  # RUNNING

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: ServerContext) -> shim_pb2.WaitResponse:
        self.wait_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append("Wait")
            raise
        return shim_pb2.WaitResponse(exit_status=7)

    async def Kill(self, req: shim_pb2.KillRequest, ctx: ServerContext) -> empty_pb2.Empty:
        raise errors.NotFound(f"process {req.id} not found")

    async def Pids(self, req: shim_pb2.PidsRequest, ctx: ServerContext) -> shim_pb2.PidsResponse:
        try:
            await asyncio.sleep(float(req.id or "10"))
        except asyncio.CancelledError:
            self.cancelled.append("Pids")
            raise
        return shim_pb2.PidsResponse()

    async def Delete(self, req: shim_pb2.DeleteRequest, ctx: ServerContext) -> shim_pb2.DeleteResponse:
        raise RuntimeError("boom")

    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: ServerContext) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse(id="wrong type")  # a handler bug: not a ConnectResponse

    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: ServerContext) -> empty_pb2.Empty:
        return empty_pb2.Empty()


def request_bytes(method: str = "State", payload: bytes | None = None, *, service: str = SVC,
                  timeout_nano: int = 0) -> bytes:
    if payload is None:
        payload = shim_pb2.StateRequest(id="q").SerializeToString()
    return ttrpc_pb2.Request(service=service, method=method, payload=payload,
                             timeout_nano=timeout_nano).SerializeToString()


async def read_response(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, ttrpc_pb2.Response]:
    async with asyncio.timeout(timeout):
        frame = await framing.read_frame(reader)
    assert frame is not None, "connection closed instead of answering"
    assert frame.type == framing.MSG_RESPONSE
    return frame.stream_id, ttrpc_pb2.Response.FromString(frame.payload)


async def assert_no_other_tasks(timeout: float = 2.0) -> None:
    """Every task but the current one has finished (nothing leaked)."""
    current = asyncio.current_task()
    others: list[asyncio.Task[object]] = []
    async with asyncio.timeout(timeout):
        while True:
            others = [t for t in asyncio.all_tasks() if t is not current]
            if not others:
                return
            try:
                await asyncio.sleep(0.01)
            except TimeoutError:
                break
    raise AssertionError(f"leaked tasks: {others}")
