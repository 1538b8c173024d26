"""Server behaviour on the wire, driven with raw frames over real Unix sockets."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from ttrpc_testlib import SVC, TASK, TaskImpl, assert_no_other_tasks, read_response, request_bytes

from common import errors
from proto.containerd.task.v2 import shim_pb2
from proto.ttrpc import ttrpc_pb2
from ttrpc import Client, Server, ServerContext, framing

Served = tuple[Server, TaskImpl, str]


def _state_pid(resp: ttrpc_pb2.Response) -> int:
    assert not resp.HasField("status") or resp.status.code == 0, resp.status
    return shim_pb2.StateResponse.FromString(resp.payload).pid


async def test_coalesced_requests_and_byte_by_byte_request(served: Served) -> None:
    _, _, path = served
    r, w = await asyncio.open_unix_connection(path)
    w.write(b"".join(framing.encode(sid, framing.MSG_REQUEST, request_bytes()) for sid in (1, 3, 5)))
    got = {}
    for _ in range(3):
        sid, resp = await read_response(r)
        got[sid] = _state_pid(resp)
    assert got == {1: 42, 3: 42, 5: 42}
    for b in framing.encode(7, framing.MSG_REQUEST, request_bytes()):
        w.write(bytes([b]))
        await w.drain()
        await asyncio.sleep(0.001)
    sid, resp = await read_response(r)
    assert (sid, _state_pid(resp)) == (7, 42)
    w.close()


@pytest.mark.parametrize("sid", [0, 2, 1 << 31])
async def test_even_stream_id_answers_invalid_argument_and_keeps_serving(served: Served, sid: int) -> None:
    _, _, path = served
    r, w = await asyncio.open_unix_connection(path)
    w.write(framing.encode(sid, framing.MSG_REQUEST, request_bytes()))
    got_sid, resp = await read_response(r)
    assert got_sid == sid and resp.status.code == errors.Code.INVALID_ARGUMENT
    w.write(framing.encode(3, framing.MSG_REQUEST, request_bytes()))
    assert _state_pid((await read_response(r))[1]) == 42
    w.close()


async def test_oversized_frame_answers_resource_exhausted_then_serves(served: Served) -> None:
    _, _, path = served
    r, w = await asyncio.open_unix_connection(path)
    big = framing.MAX_PAYLOAD + 10
    w.write(struct.pack(">IIBB", big, 9, framing.MSG_REQUEST, 0))
    chunk = b"\0" * (1 << 20)
    for off in range(0, big, len(chunk)):
        w.write(chunk[: big - off])
        await w.drain()
    w.write(framing.encode(11, framing.MSG_REQUEST, request_bytes()))
    sid, resp = await read_response(r, 20)
    assert sid == 9 and resp.status.code == errors.Code.RESOURCE_EXHAUSTED
    sid, resp = await read_response(r)
    assert (sid, _state_pid(resp)) == (11, 42)
    w.close()


async def test_bad_request_bytes_and_bad_payload_answer_invalid_argument(served: Served) -> None:
    _, _, path = served
    r, w = await asyncio.open_unix_connection(path)
    w.write(framing.encode(1, framing.MSG_REQUEST, b"\xff\xff\xff"))
    sid, resp = await read_response(r)
    assert sid == 1 and resp.status.code == errors.Code.INVALID_ARGUMENT
    w.write(framing.encode(3, framing.MSG_REQUEST, request_bytes(payload=b"\x0a\xff")))
    sid, resp = await read_response(r)
    assert sid == 3 and resp.status.code == errors.Code.INVALID_ARGUMENT
    # a response frame or an unknown type sent by a client is skipped, not answered
    w.write(framing.encode(5, framing.MSG_RESPONSE, b"junk") + framing.encode(5, 9, b"junk"))
    w.write(framing.encode(7, framing.MSG_REQUEST, request_bytes()))
    sid, resp = await read_response(r)
    assert (sid, _state_pid(resp)) == (7, 42)
    w.close()


async def test_unknown_service_and_method_are_unimplemented(served: Served) -> None:
    _, _, path = served
    r, w = await asyncio.open_unix_connection(path)
    w.write(framing.encode(1, framing.MSG_REQUEST, request_bytes("State", service="no.such.Svc")))
    _, resp = await read_response(r)
    assert resp.status.code == errors.Code.UNIMPLEMENTED
    assert "no.such.Svc" in resp.status.message and "State" in resp.status.message
    # Checkpoint exists in the descriptor, but TaskImpl has no such method
    w.write(framing.encode(3, framing.MSG_REQUEST, request_bytes("Checkpoint", b"")))
    _, resp = await read_response(r)
    assert resp.status.code == errors.Code.UNIMPLEMENTED and "Checkpoint" in resp.status.message
    w.close()


async def test_empty_success_is_a_zero_length_response(served: Served) -> None:
    _, _, path = served
    r, w = await asyncio.open_unix_connection(path)
    w.write(framing.encode(1, framing.MSG_REQUEST, request_bytes("Shutdown", b"")))
    async with asyncio.timeout(5):
        frame = await framing.read_frame(r)
    assert frame is not None and frame.length == 0 and frame.payload == b""
    w.close()


async def test_server_deadline_cancels_handler(served: Served, caplog) -> None:
    _, impl, path = served
    r, w = await asyncio.open_unix_connection(path)
    payload = shim_pb2.PidsRequest(id="30").SerializeToString()
    w.write(framing.encode(1, framing.MSG_REQUEST, request_bytes("Pids", payload, timeout_nano=100_000_000)))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    _, resp = await read_response(r)
    assert resp.status.code == errors.Code.DEADLINE_EXCEEDED
    assert loop.time() - t0 < 5
    assert impl.cancelled == ["Pids"]
    # logged where the server runs (the guest console for the agent): the host gave up here
    assert any("Pids: the caller's deadline of 0.1s passed" in r.getMessage() for r in caplog.records)
    w.close()


async def test_context_carries_metadata_deadline_and_peer(served: Served) -> None:
    _, impl, path = served
    c = await Client.connect_unix(path)
    loop = asyncio.get_running_loop()
    before = loop.time()
    await c.call(SVC, "State", shim_pb2.StateRequest(id="m"), shim_pb2.StateResponse, timeout=30,
                 metadata={"containerd-namespace-ttrpc": "k8s.io"})
    ctx = impl.contexts[-1]
    assert (ctx.service, ctx.method) == (SVC, "State")
    assert ctx.metadata == {"containerd-namespace-ttrpc": ["k8s.io"]}
    assert ctx.deadline is not None and before + 25 < ctx.deadline < loop.time() + 31
    assert ctx.peer == (os.getpid(), os.geteuid(), os.getegid())
    await c.call(SVC, "State", shim_pb2.StateRequest(id="n"), shim_pb2.StateResponse)
    assert impl.contexts[-1].deadline is None and impl.contexts[-1].time_remaining() is None
    await c.close()


async def test_handler_exceptions_map_through_status_of(served: Served) -> None:
    _, _, path = served
    c = await Client.connect_unix(path)
    with pytest.raises(errors.NotFound, match="process x not found"):
        await c.call(SVC, "Kill", shim_pb2.KillRequest(id="x"), empty_pb2.Empty)
    with pytest.raises(errors.Internal, match="RuntimeError: boom"):
        await c.call(SVC, "Delete", shim_pb2.DeleteRequest(id="x"), shim_pb2.DeleteResponse)
    with pytest.raises(errors.Internal, match="ConnectResponse"):  # wrong response type returned
        await c.call(SVC, "Connect", shim_pb2.ConnectRequest(id="x"), shim_pb2.ConnectResponse)
    await c.close()


async def test_custom_status_of_and_handler_cancelling_itself(tmp_path: Path) -> None:
    seen: list[BaseException] = []

    def status_of(exc: BaseException) -> tuple[int, str]:
        seen.append(exc)
        return int(errors.Code.FAILED_PRECONDITION), f"custom: {exc!r}"

    async def gives_up(req: empty_pb2.Empty, ctx: ServerContext) -> empty_pb2.Empty:
        raise asyncio.CancelledError()  # e.g. an inner task it awaited was cancelled

    async def fails(req: empty_pb2.Empty, ctx: ServerContext) -> empty_pb2.Empty:
        raise KeyError("k")

    server = Server(status_of=status_of)
    server.register("t.S", "GivesUp", empty_pb2.Empty, gives_up)
    server.register("t.S", "Fails", empty_pb2.Empty, fails)
    path = str(tmp_path / "c.sock")
    await server.start_unix(path)
    c = await Client.connect_unix(path)
    with pytest.raises(errors.FailedPrecondition, match="custom: KeyError"):
        await c.call("t.S", "Fails", empty_pb2.Empty(), empty_pb2.Empty, timeout=5)
    with pytest.raises(errors.FailedPrecondition, match="custom: CancelledError"):
        await c.call("t.S", "GivesUp", empty_pb2.Empty(), empty_pb2.Empty, timeout=5)
    assert [type(e) for e in seen] == [KeyError, asyncio.CancelledError]
    await c.close()
    await server.close()
    await assert_no_other_tasks()


async def test_oversized_response_answers_resource_exhausted(tmp_path: Path) -> None:
    async def huge(req: empty_pb2.Empty, ctx: ServerContext) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse(id="x" * 2000)

    server = Server(max_payload=1000)
    server.register("t.S", "Huge", empty_pb2.Empty, huge)
    path = str(tmp_path / "h.sock")
    await server.start_unix(path)
    c = await Client.connect_unix(path)
    with pytest.raises(errors.ResourceExhausted):
        await c.call("t.S", "Huge", empty_pb2.Empty(), shim_pb2.StateResponse, timeout=5)
    await c.close()
    await server.close()


async def test_peer_closing_mid_frame_ends_connection_and_cancels_handlers(served: Served) -> None:
    server, impl, path = served
    closed = asyncio.Event()
    server.on_connection_closed = closed.set
    r, w = await asyncio.open_unix_connection(path)
    w.write(framing.encode(1, framing.MSG_REQUEST, request_bytes("Wait", b"")))
    w.write(struct.pack(">IIBB", 100, 3, framing.MSG_REQUEST, 0) + b"abc")  # truncated frame
    await asyncio.wait_for(impl.wait_started.wait(), 5)
    assert server.connection_count == 1
    w.close()
    await asyncio.wait_for(closed.wait(), 5)
    assert server.connection_count == 0
    assert impl.cancelled == ["Wait"]
    await assert_no_other_tasks()


async def test_close_cancels_handlers_fails_clients_and_leaks_nothing(served: Served) -> None:
    server, impl, path = served
    c = await Client.connect_unix(path)
    wait = asyncio.create_task(c.call(SVC, "Wait", shim_pb2.WaitRequest(id="a"), shim_pb2.WaitResponse))
    await asyncio.wait_for(impl.wait_started.wait(), 5)
    await server.close()
    with pytest.raises(errors.ConnectionClosed):
        await asyncio.wait_for(wait, 5)
    assert impl.cancelled == ["Wait"] and server.connection_count == 0
    await asyncio.wait_for(c.wait_closed(), 5)
    await c.close()
    assert not os.path.exists(path)
    await assert_no_other_tasks()


async def test_serve_connection_over_socketpair_returns_on_eof_and_close_spares_caller() -> None:
    server = Server()
    impl = TaskImpl()
    server.register_service(TASK, impl)
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    cr, cw = await asyncio.open_connection(sock=b)
    ends: list[str] = []
    server.on_connection_closed = lambda: ends.append("closed")

    async def caller() -> str:  # like the agent's loop: serve, then carry on
        await server.serve_connection(sr, sw)
        return "carried on"

    serving = asyncio.create_task(caller())
    c = Client(cr, cw)
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="p"), shim_pb2.StateResponse)).id == "p"
    assert server.connection_count == 1
    wait = asyncio.create_task(c.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse))
    await asyncio.wait_for(impl.wait_started.wait(), 5)
    await server.close()  # cancels the connection, not the task that called serve_connection
    assert await asyncio.wait_for(serving, 5) == "carried on"
    with pytest.raises(errors.ConnectionClosed):
        await asyncio.wait_for(wait, 5)
    assert ends == ["closed"] and impl.cancelled == ["Wait"]
    await c.close()
    await assert_no_other_tasks()


async def test_cancelling_serve_connection_caller_propagates() -> None:
    server = Server()
    server.register_service(TASK, TaskImpl())
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    _, cw = await asyncio.open_connection(sock=b)
    serving = asyncio.create_task(server.serve_connection(sr, sw))
    await asyncio.sleep(0.05)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert server.connection_count == 0
    cw.close()
    await assert_no_other_tasks()


async def test_start_unix_mode_stale_socket_and_live_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    server = Server()
    server.register_service(TASK, TaskImpl())
    await server.start_unix(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    other = Server()
    with pytest.raises(errors.AlreadyExists):
        await other.start_unix(path)  # a live server owns it: not stolen
    c = await Client.connect_unix(f"unix://{path}")
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="s"), shim_pb2.StateResponse)).id == "s"
    await c.close()
    await server.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(errors.AlreadyExists):
        await Server().start_unix(str(regular))
    assert regular.read_text() == "x"


async def test_start_unix_on_a_handed_over_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "fd3.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    inherited = socket.socket(fileno=os.dup(sock.fileno()))  # as if passed as fd 3 by a parent
    sock.close()
    server = Server()
    server.register_service(TASK, TaskImpl())
    await server.start_unix(sock=inherited)
    c = await Client.connect_unix(path, timeout=5)
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="h"), shim_pb2.StateResponse)).pid == 42
    await c.close()
    await server.close()
    await assert_no_other_tasks()


async def test_listening_on_several_sockets(tmp_path: Path) -> None:
    server = Server()
    server.register_service(TASK, TaskImpl())
    paths = [str(tmp_path / f"{i}.sock") for i in range(2)]
    for p in paths:
        await server.start_unix(p)
    for p in paths:
        c = await Client.connect_unix(p, timeout=5)
        assert (await c.call(SVC, "State", shim_pb2.StateRequest(id=p), shim_pb2.StateResponse)).id == p
        await c.close()
    await server.close()
    assert not any(os.path.exists(p) for p in paths)
    await assert_no_other_tasks()
