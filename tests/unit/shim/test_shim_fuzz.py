"""1,000 random and mutated ttrpc frames against the shim's Task socket: it keeps serving."""
from __future__ import annotations

import asyncio
import random
import struct

import pytest

from common.errors import to_status
from proto.containerd.task.v2 import shim_pb2
from proto.ttrpc import ttrpc_pb2
from shim.events import EventPublisher
from shim.task_service import TaskService
from tests.fakes.host_process_backend import HostProcessBackend
from ttrpc import Client, Server

pytestmark = pytest.mark.asyncio
TASK = "containerd.task.v2.Task"
METHODS = [m.name for m in shim_pb2.DESCRIPTOR.services_by_name["Task"].methods]


def frame(payload: bytes, sid: int, mtype: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", len(payload), sid, mtype, flags) + payload


def valid_request(rng: random.Random) -> bytes:
    method = rng.choice([m for m in METHODS if m not in ("Shutdown", "Create")])
    inner = getattr(shim_pb2, {"Checkpoint": "CheckpointTaskRequest", "Exec": "ExecProcessRequest",
                               "Update": "UpdateTaskRequest"}.get(method, method + "Request"))
    msg = inner()
    if hasattr(msg, "id"):
        msg.id = rng.choice(["", "c", "x" * 300, "../etc", "\u00e9"])
    return ttrpc_pb2.Request(service=TASK, method=method, payload=msg.SerializeToString(),
                             timeout_nano=rng.choice([0, 10**6])).SerializeToString()


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.5 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op < 0.75:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif b:
            del b[rng.randrange(len(b))]
    return bytes(b)


async def test_thousand_bad_frames_leave_the_shim_serving(tmp_path):
    rng = random.Random(20240601)
    pub = EventPublisher("", "ns")
    service = TaskService(namespace="ns", sandbox_id="fz", backend_factory=HostProcessBackend,
                          publisher=pub, state_root=str(tmp_path / "state"))
    server = Server(status_of=to_status)
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
    path = str(tmp_path / "shim.sock")
    await server.start_unix(path)
    good = await Client.connect_unix(path)
    sent = 0
    try:
        while sent < 1000:
            reader, writer = await asyncio.open_unix_connection(path)
            batch = bytearray()
            for _ in range(20):
                kind = rng.random()
                sid = rng.choice([1, 2, 3, 0xFFFFFFFF, rng.randrange(1 << 32)])
                if kind < 0.3:
                    batch += frame(mutate(rng, valid_request(rng)), sid)
                elif kind < 0.5:
                    batch += frame(valid_request(rng), sid, mtype=rng.choice([1, 2, 3, 0, 255]),
                                   flags=rng.randrange(256))
                elif kind < 0.7:
                    batch += frame(rng.randbytes(rng.randrange(64)), sid)
                elif kind < 0.8:  # header announcing a different length than sent
                    batch += struct.pack(">IIBB", rng.randrange(1 << 16), sid, 1, 0)
                    batch += rng.randbytes(rng.randrange(32))
                else:
                    batch += mutate(rng, frame(valid_request(rng), sid))
                sent += 1
            writer.write(bytes(batch))
            try:
                await writer.drain()
                await asyncio.wait_for(reader.read(1 << 16), 0.05)
            except (TimeoutError, ConnectionError):
                pass
            writer.close()
            # the established, well-behaved connection still gets answers
            with pytest.raises(Exception) as info:
                await good.call(TASK, "State", shim_pb2.StateRequest(id="nope"),
                                shim_pb2.StateResponse, timeout=5)
            assert type(info.value).__name__ == "NotFound"
        fresh = await Client.connect_unix(path)
        conn = await fresh.call(TASK, "Connect", shim_pb2.ConnectRequest(id="x"),
                                shim_pb2.ConnectResponse, timeout=5)
        assert conn.shim_pid > 0
        await fresh.close()
        assert sent >= 1000
    finally:
        await good.close()
        await server.close()
        await service.close()
