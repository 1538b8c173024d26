"""Random and mutated frames must never crash the server nor desynchronise a connection."""
from __future__ import annotations

import asyncio
import random
import struct
from collections import Counter

from ttrpc_testlib import SVC, TaskImpl, request_bytes

from common import errors
from proto.containerd.task.v2 import shim_pb2
from proto.ttrpc import ttrpc_pb2
from ttrpc import Client, Server, framing

Served = tuple[Server, TaskImpl, str]
VALID_CODES = {int(c) for c in errors.Code}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(3)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.getrandbits(8)
        elif op == 1 and buf:
            del buf[rng.randrange(len(buf))]
        else:
            buf.insert(rng.randrange(len(buf) + 1), rng.getrandbits(8))
    return bytes(buf)


def _fuzz_frame(rng: random.Random, max_payload: int) -> tuple[int, int, bytes]:
    """(stream id, type, payload) of a well-framed but otherwise arbitrary message."""
    kind = rng.randrange(6)
    state = shim_pb2.StateRequest(id="f").SerializeToString()
    if kind == 0:
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
    elif kind == 1:
        payload = _mutate(rng, request_bytes("State", state))
    elif kind == 2:
        payload = request_bytes("State", _mutate(rng, state))
    elif kind == 3:
        name = "".join(rng.choice("abcXYZ./") for _ in range(rng.randint(0, 12)))
        payload = request_bytes(name, state, service=rng.choice([SVC, name]))
    elif kind == 4:
        payload = b"\0" * rng.randint(max_payload + 1, max_payload + 300)  # oversized
    else:
        payload = request_bytes("State", state, timeout_nano=rng.choice([1, 1000, 10**9, -5, 2**62]))
    sid = rng.choice([0, rng.randrange(0, 2**32, 2), rng.randrange(1, 2**32, 2), rng.randrange(1, 50, 2)])
    mtype = rng.choice([framing.MSG_REQUEST] * 6 + [0, framing.MSG_RESPONSE, 3, 255])
    return sid, mtype, payload


async def test_fuzzed_frames_on_one_connection_each_request_answered_once(tmp_path: object) -> None:
    server = Server(max_payload=512)
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], TaskImpl())
    path = f"{tmp_path}/fuzz.sock"
    await server.start_unix(path)
    rng = random.Random(20240601)
    reader, writer = await asyncio.open_unix_connection(path)
    expected: Counter[int] = Counter()
    answered: Counter[int] = Counter()

    async def collect() -> None:
        while (frame := await framing.read_frame(reader)) is not None:
            assert frame.type == framing.MSG_RESPONSE
            resp = ttrpc_pb2.Response.FromString(frame.payload)
            assert resp.status.code in VALID_CODES
            answered[frame.stream_id] += 1

    collector = asyncio.create_task(collect())
    for _ in range(1000):
        sid, mtype, payload = _fuzz_frame(rng, 512)
        if mtype == framing.MSG_REQUEST:
            expected[sid] += 1
        writer.write(framing.encode(sid, mtype, payload, flags=rng.choice([0, 0, 1, 0xFF])))
        await writer.drain()
    async with asyncio.timeout(20):
        while answered != expected:
            await asyncio.sleep(0.02)
    assert sum(expected.values()) > 500
    # the same connection still serves a regular call
    collector.cancel()  # a client takes the stream over once the collector is gone
    await asyncio.wait({collector})
    c = Client(reader, writer)
    r = await c.call(SVC, "State", shim_pb2.StateRequest(id="alive"), shim_pb2.StateResponse, timeout=5)
    assert r.id == "alive"
    await c.close()
    await server.close()


async def test_garbage_connections_never_take_the_server_down(served: Served) -> None:
    server, _, path = served
    rng = random.Random(99)
    valid = framing.encode(1, framing.MSG_REQUEST, request_bytes())
    for i in range(200):
        _, w = await asyncio.open_unix_connection(path)
        kind = i % 3
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif kind == 1:
            data = _mutate(rng, valid)
        else:
            data = valid[: rng.randint(1, len(valid) - 1)]  # truncated mid-frame
        if len(data) >= 4 and struct.unpack(">I", data[:4])[0] > 1 << 16:
            data = struct.pack(">I", 16) + data[4:]  # keep it fast: no multi-GB discards
        w.write(data)
        await w.drain()
        w.close()
    c = await Client.connect_unix(path)
    r = await c.call(SVC, "State", shim_pb2.StateRequest(id="alive"), shim_pb2.StateResponse, timeout=5)
    assert r.id == "alive"
    await c.close()
    async with asyncio.timeout(10):
        while server.connection_count:
            await asyncio.sleep(0.02)
