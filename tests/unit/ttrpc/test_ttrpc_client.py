"""Client behaviour: concurrency, deadlines, status mapping, connection loss."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from ttrpc_testlib import SVC, TaskImpl, assert_no_other_tasks

from common import errors
from proto.containerd.task.v2 import shim_pb2
from proto.ttrpc import ttrpc_pb2
from ttrpc import Client, Server, ServerContext, framing

Served = tuple[Server, TaskImpl, str]


async def test_round_trip_and_status_round_trip(served: Served) -> None:
    _, _, path = served
    c = await Client.connect_unix(path)
    r = await c.call(SVC, "State", shim_pb2.StateRequest(id="a", exec_id="e"), shim_pb2.StateResponse)
    assert (r.id, r.exec_id, r.pid) == ("a", "e", 42)
    with pytest.raises(errors.NotFound) as info:
        await c.call(SVC, "Kill", shim_pb2.KillRequest(id="x"), empty_pb2.Empty)
    assert info.value.code == errors.Code.NOT_FOUND and info.value.message == "process x not found"
    with pytest.raises(errors.Unimplemented):
        await c.call("no.such.Service", "X", empty_pb2.Empty(), empty_pb2.Empty)
    raw = await c.call_raw(SVC, "State", shim_pb2.StateRequest(id="r").SerializeToString())
    assert shim_pb2.StateResponse.FromString(raw).id == "r"
    await c.close()


async def test_blocked_call_does_not_stop_others_responses_out_of_order(served: Served) -> None:
    _, impl, path = served
    c = await Client.connect_unix(path)
    wait = asyncio.create_task(c.call(SVC, "Wait", shim_pb2.WaitRequest(id="a"), shim_pb2.WaitResponse))
    await asyncio.wait_for(impl.wait_started.wait(), 5)
    for i in range(20):  # answered while the earlier Wait (stream 1) is still pending
        r = await c.call(SVC, "State", shim_pb2.StateRequest(id=str(i)), shim_pb2.StateResponse)
        assert r.id == str(i)
    assert not wait.done()
    impl.release.set()
    assert (await asyncio.wait_for(wait, 5)).exit_status == 7
    await c.close()


async def test_many_concurrent_calls_each_get_their_own_answer(tmp_path: Path) -> None:
    async def echo(req: shim_pb2.StateRequest, ctx: ServerContext) -> shim_pb2.StateResponse:
        await asyncio.sleep(int(req.exec_id) / 1000)
        return shim_pb2.StateResponse(id=req.id)

    server = Server()
    server.register(SVC, "State", shim_pb2.StateRequest, echo)
    path = str(tmp_path / "e.sock")
    await server.start_unix(path)
    c = await Client.connect_unix(path)
    rng = random.Random(7)
    delays = [rng.randint(0, 30) for _ in range(200)]
    order: list[str] = []

    async def one(i: int) -> str:
        r = await c.call(SVC, "State", shim_pb2.StateRequest(id=f"c{i}", exec_id=str(delays[i])),
                         shim_pb2.StateResponse, timeout=10)
        order.append(r.id)
        return r.id

    got = await asyncio.gather(*(one(i) for i in range(200)))
    assert got == [f"c{i}" for i in range(200)]
    assert order != sorted(order, key=lambda s: int(s[1:]))  # completed out of request order
    await c.close()
    await server.close()
    await assert_no_other_tasks()


async def test_client_deadline_and_connection_still_usable(served: Served) -> None:
    _, impl, path = served
    c = await Client.connect_unix(path)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(errors.DeadlineExceeded):
        await c.call(SVC, "Pids", shim_pb2.PidsRequest(id="30"), shim_pb2.PidsResponse, timeout=0.2)
    assert loop.time() - t0 < 5
    with pytest.raises(errors.DeadlineExceeded):
        await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse, timeout=0)
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="z"), shim_pb2.StateResponse)).id == "z"
    await c.close()


async def test_timeout_is_sent_and_late_response_is_dropped(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    seen: list[ttrpc_pb2.Request] = []
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (frame := await framing.read_frame(reader)) is not None:
            seen.append(ttrpc_pb2.Request.FromString(frame.payload))
            delay, payload = await queue.get()
            await asyncio.sleep(delay)  # answers strictly in order: the late one comes first
            writer.write(framing.encode(frame.stream_id, framing.MSG_RESPONSE, payload))
        writer.close()

    srv = await asyncio.start_unix_server(handle, path)
    ok = ttrpc_pb2.Response(payload=shim_pb2.StateResponse(id="late").SerializeToString())
    queue.put_nowait((0.3, ok.SerializeToString()))
    ok2 = ttrpc_pb2.Response(payload=shim_pb2.StateResponse(id="second").SerializeToString())
    queue.put_nowait((0, ok2.SerializeToString()))
    c = await Client.connect_unix(path)
    with pytest.raises(errors.DeadlineExceeded):
        await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse, timeout=0.1)
    assert 0 < seen[0].timeout_nano <= 100_000_000
    r = await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse, timeout=5)
    assert r.id == "second"  # the late "late" answer on stream 1 was dropped, not misdelivered
    assert seen[1].timeout_nano > 1_000_000_000
    await c.close()
    srv.close()
    await srv.wait_closed()


async def test_bad_response_bytes_fail_only_that_call(tmp_path: Path) -> None:
    path = str(tmp_path / "bad.sock")
    answers = [b"\xff\xff", ttrpc_pb2.Response(payload=b"\x0a\xff").SerializeToString(),
               ttrpc_pb2.Response(payload=shim_pb2.StateResponse(id="fine").SerializeToString())
               .SerializeToString()]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (frame := await framing.read_frame(reader)) is not None:
            writer.write(framing.encode(frame.stream_id, framing.MSG_RESPONSE, answers.pop(0)))
        writer.close()

    srv = await asyncio.start_unix_server(handle, path)
    c = await Client.connect_unix(path)
    with pytest.raises(errors.Internal, match="invalid ttrpc response"):
        await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse, timeout=5)
    with pytest.raises(errors.Internal, match="invalid response payload"):
        await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse, timeout=5)
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse, timeout=5)).id == "fine"
    await c.close()
    srv.close()
    await srv.wait_closed()


async def test_pending_calls_fail_with_connection_closed_when_peer_vanishes(tmp_path: Path) -> None:
    path = str(tmp_path / "x.sock")
    got_two = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await framing.read_frame(reader)
        await framing.read_frame(reader)
        got_two.set()
        writer.close()

    srv = await asyncio.start_unix_server(handle, path)
    c = await Client.connect_unix(path)
    calls = [asyncio.create_task(c.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse, timeout=5))
             for _ in range(2)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert got_two.is_set()
    assert all(isinstance(r, errors.ConnectionClosed) for r in results), results
    await asyncio.wait_for(c.wait_closed(), 5)
    assert c.closed
    with pytest.raises(errors.ConnectionClosed):
        await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
    await c.close()
    await c.close()  # idempotent
    srv.close()
    await srv.wait_closed()
    await assert_no_other_tasks()


async def test_close_fails_calls_in_flight(served: Served) -> None:
    _, impl, path = served
    c = await Client.connect_unix(path)
    wait = asyncio.create_task(c.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse))
    await asyncio.wait_for(impl.wait_started.wait(), 5)
    await c.close()
    assert c.closed
    with pytest.raises(errors.ConnectionClosed):
        await wait
    await asyncio.wait_for(c.wait_closed(), 1)
    for _ in range(100):  # the server notices the EOF and cancels the handler
        if impl.cancelled:
            break
        await asyncio.sleep(0.01)
    assert impl.cancelled == ["Wait"]


async def test_oversized_request_rejected_locally_without_sending(served: Served) -> None:
    _, impl, path = served
    c = await Client.connect_unix(path)
    with pytest.raises(errors.ResourceExhausted):
        await c.call_raw(SVC, "State", b"x" * framing.MAX_PAYLOAD)
    small = Client(*(await _open(path)), max_payload=64)
    with pytest.raises(errors.ResourceExhausted):
        await small.call(SVC, "State", shim_pb2.StateRequest(id="y" * 100), shim_pb2.StateResponse)
    assert impl.contexts == []  # nothing reached the server
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="ok"), shim_pb2.StateResponse)).id == "ok"
    await small.close()
    await c.close()


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def test_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable):
        await Client.connect_unix(str(tmp_path / "missing.sock"))
    with pytest.raises(errors.Unavailable):
        await Client.connect_unix(f"unix://{tmp_path}/missing.sock", timeout=1)
