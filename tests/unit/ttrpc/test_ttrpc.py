import asyncio
import os
import random
import socket
import struct

import pytest
from google.protobuf import empty_pb2

from proto.containerd.task.v2 import shim_pb2
from proto.ttrpc import ttrpc_pb2
from shim import errors
from ttrpc import Client, Server, framing
from ttrpc.stream import open_fd_stream

SVC = "containerd.task.v2.Task"


class Impl:
    def __init__(self):
        self.release = asyncio.Event()

    async def State(self, req, ctx):
        return shim_pb2.StateResponse(id=req.id, pid=42, status=2)

    async def Wait(self, req, ctx):
        await self.release.wait()
        return shim_pb2.WaitResponse(exit_status=7)

    async def Kill(self, req, ctx):
        raise errors.NotFound(f"process {req.id} not found")

    async def Pids(self, req, ctx):
        await asyncio.sleep(10)
        return shim_pb2.PidsResponse()

    async def Delete(self, req, ctx):
        raise RuntimeError("boom")


@pytest.fixture
async def served(tmp_path):
    impl = Impl()
    server = Server()
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], impl)
    path = str(tmp_path / "s.sock")
    await server.start_unix(path)
    yield server, impl, path
    await server.close()
    assert not os.path.exists(path)


async def test_round_trip_and_status_mapping(served):
    server, impl, path = served
    c = await Client.connect_unix(path)
    r = await c.call(SVC, "State", shim_pb2.StateRequest(id="a"), shim_pb2.StateResponse)
    assert (r.id, r.pid, r.status) == ("a", 42, 2)
    with pytest.raises(errors.NotFound, match="process x not found"):
        await c.call(SVC, "Kill", shim_pb2.KillRequest(id="x"), empty_pb2.Empty)
    with pytest.raises(errors.Internal, match="boom"):
        await c.call(SVC, "Delete", shim_pb2.DeleteRequest(id="x"), shim_pb2.DeleteResponse)
    with pytest.raises(errors.Unimplemented):
        await c.call(SVC, "Checkpoint", shim_pb2.CheckpointTaskRequest(), empty_pb2.Empty)
    with pytest.raises(errors.Unimplemented):
        await c.call("no.such.Service", "X", empty_pb2.Empty(), empty_pb2.Empty)
    await c.close()


async def test_blocked_call_does_not_stop_others_and_responses_are_out_of_order(served):
    _, impl, path = served
    c = await Client.connect_unix(path)
    wait = asyncio.create_task(c.call(SVC, "Wait", shim_pb2.WaitRequest(id="a"), shim_pb2.WaitResponse))
    for _ in range(20):
        r = await c.call(SVC, "State", shim_pb2.StateRequest(id="b"), shim_pb2.StateResponse)
        assert r.pid == 42
    assert not wait.done()
    impl.release.set()
    assert (await wait).exit_status == 7
    await c.close()


async def test_timeouts_both_sides(served):
    server, _, path = served
    c = await Client.connect_unix(path)
    with pytest.raises(errors.DeadlineExceeded):
        await c.call(SVC, "Pids", shim_pb2.PidsRequest(id="a"), shim_pb2.PidsResponse, timeout=0.2)
    # server-side deadline: a raw request with timeout_nano and no local client timeout
    r, w = await asyncio.open_unix_connection(path)
    req = ttrpc_pb2.Request(service=SVC, method="Pids", payload=b"", timeout_nano=100_000_000)
    w.write(framing.encode(1, framing.MSG_REQUEST, req.SerializeToString()))
    frame = await asyncio.wait_for(framing.read_frame(r), 5)
    resp = ttrpc_pb2.Response.FromString(frame.payload)
    assert resp.status.code == errors.Code.DEADLINE_EXCEEDED
    w.close()
    # the connection still serves after a client-side timeout
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="z"), shim_pb2.StateResponse)).id == "z"
    await c.close()


async def _raw(path):
    return await asyncio.open_unix_connection(path)


def _req(method="State", payload=None):
    payload = payload if payload is not None else shim_pb2.StateRequest(id="q").SerializeToString()
    return ttrpc_pb2.Request(service=SVC, method=method, payload=payload).SerializeToString()


async def test_split_and_coalesced_frames(served):
    _, _, path = served
    r, w = await _raw(path)
    data = b"".join(framing.encode(sid, framing.MSG_REQUEST, _req()) for sid in (1, 3, 5))
    w.write(data)  # coalesced
    got = {(await framing.read_frame(r)).stream_id for _ in range(3)}
    assert got == {1, 3, 5}
    one = framing.encode(7, framing.MSG_REQUEST, _req())
    for b in one:  # split byte by byte
        w.write(bytes([b]))
        await w.drain()
        await asyncio.sleep(0)
    frame = await asyncio.wait_for(framing.read_frame(r), 5)
    assert frame.stream_id == 7
    assert shim_pb2.StateResponse.FromString(ttrpc_pb2.Response.FromString(frame.payload).payload).pid == 42
    w.close()


async def test_even_stream_id_oversized_and_garbage_payload(served):
    _, _, path = served
    r, w = await _raw(path)
    w.write(framing.encode(2, framing.MSG_REQUEST, _req()))
    resp = ttrpc_pb2.Response.FromString((await framing.read_frame(r)).payload)
    assert resp.status.code == errors.Code.INVALID_ARGUMENT
    big = framing.MAX_PAYLOAD + 10
    w.write(struct.pack(">IIBB", big, 9, 1, 0))
    w.write(b"\0" * big)
    frame = await asyncio.wait_for(framing.read_frame(r), 10)
    assert frame.stream_id == 9
    assert ttrpc_pb2.Response.FromString(frame.payload).status.code == errors.Code.RESOURCE_EXHAUSTED
    w.write(framing.encode(11, framing.MSG_REQUEST, b"\xff\xff\xff"))
    frame = await framing.read_frame(r)
    assert ttrpc_pb2.Response.FromString(frame.payload).status.code == errors.Code.INVALID_ARGUMENT
    w.write(framing.encode(13, framing.MSG_REQUEST, _req(payload=b"\x0a\xff")))
    frame = await framing.read_frame(r)
    assert ttrpc_pb2.Response.FromString(frame.payload).status.code == errors.Code.INVALID_ARGUMENT
    w.write(framing.encode(15, framing.MSG_REQUEST, _req()))
    frame = await framing.read_frame(r)
    assert frame.stream_id == 15 and not ttrpc_pb2.Response.FromString(frame.payload).HasField("status")
    w.close()


async def test_peer_closing_mid_frame_leaves_no_tasks(served):
    server, impl, path = served
    r, w = await _raw(path)
    w.write(framing.encode(1, framing.MSG_REQUEST, _req("Wait", b""))[:-0 or None])
    w.write(struct.pack(">IIBB", 100, 3, 1, 0) + b"abc")
    await w.drain()
    await asyncio.sleep(0.1)
    assert server.connection_count == 1
    w.close()
    for _ in range(50):
        if server.connection_count == 0:
            break
        await asyncio.sleep(0.02)
    assert server.connection_count == 0
    pending = [t for t in asyncio.all_tasks() if "Wait" in repr(t.get_coro())]
    assert pending == []


async def test_client_fails_pending_calls_when_peer_vanishes(tmp_path):
    path = str(tmp_path / "x.sock")
    accepted = asyncio.Event()

    async def handle(reader, writer):
        accepted.set()
        await reader.readexactly(framing.HEADER_SIZE)
        writer.close()

    srv = await asyncio.start_unix_server(handle, path)
    c = await Client.connect_unix(path)
    with pytest.raises(errors.ConnectionClosed):
        await c.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse, timeout=5)
    await asyncio.wait_for(c.wait_closed(), 5)
    assert c.closed
    with pytest.raises(errors.ConnectionClosed):
        await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
    await c.close()
    await c.close()
    srv.close()


async def test_oversized_request_rejected_locally(served):
    _, _, path = served
    c = await Client.connect_unix(path)
    with pytest.raises(errors.ResourceExhausted):
        await c.call_raw(SVC, "State", b"x" * (framing.MAX_PAYLOAD + 1))
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="ok"), shim_pb2.StateResponse)).id == "ok"
    await c.close()


async def test_connect_errors():
    with pytest.raises(errors.Unavailable):
        await Client.connect_unix("/nonexistent/kc.sock")


async def test_peercred_rejects_other_uid():
    import shutil
    import tempfile
    tmp_path = __import__("pathlib").Path(tempfile.mkdtemp(prefix="kc-peercred-", dir="/tmp"))
    server = Server()
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], Impl())
    path = str(tmp_path / "p.sock")
    await server.start_unix(path)
    os.chmod(path, 0o777)
    os.chmod(tmp_path, 0o777)
    # a child with another uid connects and tries a call; it must be disconnected
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(framing.encode(1, framing.MSG_REQUEST, _req()))
            try:
                data = s.recv(100)
            except ConnectionResetError:  # closed with our request unread
                data = b""
            os.write(w, b"closed" if not data else b"answered")
        except BaseException as exc:
            os.write(w, repr(exc).encode()[:20])
        finally:
            os._exit(0)
    os.close(w)
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, os.read, r, 20)
    await loop.run_in_executor(None, os.waitpid, pid, 0)
    os.close(r)
    await server.close()
    shutil.rmtree(tmp_path)
    assert result == b"closed"


async def test_fuzz_random_and_mutated_frames_leave_server_serving(served):
    server, _, path = served
    rng = random.Random(1234)
    valid = framing.encode(1, framing.MSG_REQUEST, _req())
    for i in range(1000):
        r, w = await _raw(path)
        kind = i % 3
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif kind == 1:
            data = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data)
        else:
            data = valid[: rng.randint(1, len(valid) - 1)]
        if len(data) >= 4 and struct.unpack(">I", data[:4])[0] > 1 << 16:
            data = struct.pack(">I", 16) + data[4:]  # keep the fuzz fast: no multi-MB discards
        w.write(data)
        await w.drain()
        w.close()
    c = await Client.connect_unix(path)
    r = await c.call(SVC, "State", shim_pb2.StateRequest(id="alive"), shim_pb2.StateResponse, timeout=5)
    assert r.id == "alive"
    await c.close()


async def test_serve_over_a_pipe_pair_byte_stream():
    """The guest agent serves over a single char device; here two pipes stand in for it."""
    server = Server()
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], Impl())
    a_r, b_w = os.pipe()  # client → server
    b_r, a_w = os.pipe()  # server → client
    loop = asyncio.get_running_loop()

    async def pipe_stream(rfd, wfd):
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        await loop.connect_read_pipe(lambda: proto, os.fdopen(rfd, "rb", buffering=0))
        t, p = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(wfd, "wb", buffering=0))
        return reader, asyncio.StreamWriter(t, p, reader, loop)

    sr, sw = await pipe_stream(a_r, a_w)
    cr, cw = await pipe_stream(b_r, b_w)
    serve = asyncio.create_task(server.serve_connection(sr, sw))
    c = Client(cr, cw)
    assert (await c.call(SVC, "State", shim_pb2.StateRequest(id="p"), shim_pb2.StateResponse)).id == "p"
    await c.close()
    await asyncio.wait_for(serve, 5)
    await server.close()


async def test_open_fd_stream_over_a_pty():
    import pty
    master, slave = pty.openpty()
    import tty
    tty.setraw(slave)
    reader, writer = await open_fd_stream(master)
    os.write(slave, b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    writer.write(b"pong")
    await writer.drain()
    assert os.read(slave, 4) == b"pong"
    writer.close()
    os.close(master)
    os.close(slave)
