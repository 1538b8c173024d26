"""The agent served in-process on a Unix socket: malformed, oversized and invalid requests get
InvalidArgument/ResourceExhausted/NotFound and the agent keeps serving; reaper and runner."""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_api.agent.reaper import Reaper, run, spawn
from agent_api.agent.server import Agent, find_serial_port
from agent_api.client.rpc import AgentClient
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unimplemented
from proto.kata import agent_pb2, oci_pb2
from proto.ttrpc import ttrpc_pb2
from tests.support.agent import unit_agent
from ttrpc import framing


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, str]]:
    a, sock = unit_agent(tmp_path)
    await a.start()
    yield a, sock
    await a.close()
    assert not os.path.exists(sock)


async def test_invalid_requests_keep_serving(agent: tuple[Agent, str]) -> None:
    _, sock = agent
    async with AgentClient(f"unix://{sock}") as c:
        await c.wait_ready(5)
        spec = oci_pb2.Spec(Process=oci_pb2.Process(Args=["true"]))
        for bad in ("", "../x", "a" * 200):
            with pytest.raises(InvalidArgument):
                await c.create_container(bad, spec)
        with pytest.raises(InvalidArgument):
            await c.create_container("c1", oci_pb2.Spec())  # no process
        with pytest.raises(NotFound):
            await c.create_container("c1", spec)  # no rootfs in the shared dir
        with pytest.raises(InvalidArgument):
            await c.read_stdout("c1", "", size=(1 << 20) + 1)
        with pytest.raises(NotFound):
            await c.read_stdout("c1", "")
        with pytest.raises(NotFound):
            await c.tty_win_resize("c1", "", 10, 10)
        with pytest.raises(InvalidArgument):
            await c.signal_process("c1", "e1", 0)
        with pytest.raises(InvalidArgument):
            await c.exec_process("c1", "bad/id", spec.Process)
        with pytest.raises(FailedPrecondition):
            await c.destroy_sandbox()
        with pytest.raises(InvalidArgument):
            await c.create_sandbox(storages=[agent_pb2.Storage(driver="blk", source="x",
                                                               mount_point="/run/kata-containers/x")])
        with pytest.raises(InvalidArgument):
            await c.create_sandbox(storages=[agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p",
                                                               mount_point="/etc")])
        with pytest.raises(InvalidArgument):
            await c.create_sandbox(hostname="bad host!")
        await c.create_sandbox(sandbox_id="sb1")
        with pytest.raises(AlreadyExists):
            await c.create_sandbox(sandbox_id="sb1")
        await c.destroy_sandbox()
        assert await c.check()


async def test_malformed_and_oversized_frames(agent: tuple[Agent, str]) -> None:
    _, sock = agent
    reader, writer = await asyncio.open_unix_connection(sock)

    async def roundtrip(sid: int, payload: bytes, declared: int | None = None) -> ttrpc_pb2.Response:
        if declared is None:
            writer.write(framing.encode(sid, framing.MSG_REQUEST, payload))
        else:
            writer.write(framing.encode_header(declared, sid, framing.MSG_REQUEST) + payload)
        await writer.drain()
        frame = await framing.read_frame(reader, accept=(framing.MSG_RESPONSE,))
        assert frame is not None and frame.stream_id == sid
        resp = ttrpc_pb2.Response()
        resp.ParseFromString(frame.payload)
        return resp

    garbage = ttrpc_pb2.Request(service="grpc.AgentService", method="CreateContainer",
                                payload=b"\xff\xff\xff\xff").SerializeToString()
    assert (await roundtrip(1, garbage)).status.code == InvalidArgument.code
    big = framing.MAX_PAYLOAD + 1
    assert (await roundtrip(3, b"\0" * big, declared=big)).status.code == ResourceExhausted.code
    unknown = ttrpc_pb2.Request(service="grpc.AgentService", method="SetPolicy").SerializeToString()
    assert (await roundtrip(5, unknown)).status.code == Unimplemented.code
    check = ttrpc_pb2.Request(service="grpc.Health", method="Check").SerializeToString()
    resp = await roundtrip(7, check)
    assert resp.status.code == 0 and resp.payload == b"\x08\x01"  # status: SERVING
    writer.close()
    await writer.wait_closed()


async def test_reaper_and_run() -> None:
    reaper = Reaper()
    reaper.install(subreaper=False)
    try:
        res = await run(reaper, ["sh", "-c", "cat; echo err >&2; exit 4"], input=b"in", timeout=10)
        assert (res.code, res.stdout, res.stderr) == (4, b"in", b"err\n")
        killed = await run(reaper, ["sh", "-c", "kill -9 $$"], timeout=10)
        assert killed.code == 128 + 9
        pid = spawn(["true"])
        for _ in range(200):  # let SIGCHLD reap it before anyone watches: the exit is kept
            await asyncio.sleep(0.01)
            if pid in reaper._unclaimed:
                break
        assert await asyncio.wait_for(reaper.watch(pid), 5) == 0
        from common.errors import DeadlineExceeded
        with pytest.raises(DeadlineExceeded):
            await run(reaper, ["sleep", "10"], timeout=0.2)
    finally:
        reaper.uninstall()


def test_find_serial_port(tmp_path: Path) -> None:
    for port, name in (("vport1p1", "org.qemu.guest_agent.0"), ("vport2p3", "agent.channel.0")):
        (tmp_path / port).mkdir()
        (tmp_path / port / "name").write_text(name + "\n")
    assert find_serial_port("agent.channel.0", str(tmp_path)) == "/dev/vport2p3"
    assert find_serial_port("missing", str(tmp_path)) is None
