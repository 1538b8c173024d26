"""AgentClient: timeout table, address parsing, hybrid vsock handshake, deadlines."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent_api.client import transport
from agent_api.client.rpc import TIMEOUTS, AgentClient
from common.errors import AgentError, DeadlineExceeded, InvalidArgument
from proto.kata import agent_pb2, health_pb2
from proto.kata_colo import colo_pb2, debug_pb2

BLOCKING = {"WaitProcess", "ReadStdout", "ReadStderr", "GetOOMEvent"}


def test_timeout_table_covers_every_rpc() -> None:
    methods = {m.name for m in agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods}
    methods |= {m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods}
    methods |= {m.name for m in colo_pb2.DESCRIPTOR.services_by_name["Colo"].methods}
    methods |= {m.name for m in debug_pb2.DESCRIPTOR.services_by_name["Debug"].methods}
    assert set(TIMEOUTS) == methods
    for name, value in TIMEOUTS.items():
        if name in BLOCKING:
            assert value is None, name
        else:
            assert value is not None and 1 <= value <= 120, name
    # the agent kills a runc create hung past runc.CREATE_TIMEOUT and tries once more: the
    # host must wait for both attempts
    from agent_api.agent.runc import CREATE_TIMEOUT

    assert TIMEOUTS["CreateContainer"] > 2 * CREATE_TIMEOUT


def test_client_has_a_method_per_rpc() -> None:
    import re
    for name in TIMEOUTS:
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        snake = {"online_c_p_u_mem": "online_cpu_mem", "get_o_o_m_event": "get_oom_event",
                 "add_a_r_p_neighbors": "add_arp_neighbors", "exec": "debug_exec"}.get(snake, snake)
        assert callable(getattr(AgentClient, snake)), snake


@pytest.mark.parametrize("addr,expected", [
    ("unix:///run/vc/agent.sock", transport.AgentAddress("unix", path="/run/vc/agent.sock")),
    ("vsock://3:1024", transport.AgentAddress("vsock", cid=3, port=1024)),
    ("hvsock:///run/vc/kata.hvsock:1024", transport.AgentAddress("hvsock", path="/run/vc/kata.hvsock", port=1024)),
])
def test_parse_address(addr: str, expected: transport.AgentAddress) -> None:
    parsed = transport.parse_address(addr)
    assert parsed == expected
    assert str(parsed) == addr


@pytest.mark.parametrize("bad", ["", "/path", "unix://relative", "vsock://3", "vsock://x:1",
                                 "vsock://3:0", "vsock://3:99999999999", "hvsock:///p", "hvsock://p:1",
                                 "tcp://1.2.3.4:5"])
def test_parse_address_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        transport.parse_address(bad)


async def _line_server(path: str, answer: bytes, seen: list[bytes]) -> asyncio.base_events.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        writer.write(answer)
        await writer.drain()
        data = await reader.read(5)  # echo one payload after the handshake
        writer.write(data)
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path)


async def test_hybrid_vsock_handshake(tmp_path: Path) -> None:
    path = str(tmp_path / "hv.sock")
    seen: list[bytes] = []
    server = await _line_server(path, b"OK 1073741824\n", seen)
    try:
        reader, writer = await transport.connect(f"hvsock://{path}:1024", timeout=2)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        assert seen == [b"CONNECT 1024\n"]
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_hybrid_vsock_refused_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "hv.sock")
    seen: list[bytes] = []
    server = await _line_server(path, b"NO\n", seen)
    try:
        with pytest.raises(DeadlineExceeded, match="refused"):
            await transport.connect(f"hvsock://{path}:7", timeout=0.3)
        assert seen and all(s == b"CONNECT 7\n" for s in seen)
    finally:
        server.close()
        await server.wait_closed()


async def test_unix_connect_waits_for_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")

    async def later() -> asyncio.base_events.Server:
        await asyncio.sleep(0.2)
        return await asyncio.start_unix_server(lambda r, w: w.close(), path)

    task = asyncio.ensure_future(later())
    reader, writer = await transport.connect(f"unix://{path}", timeout=3)
    writer.close()
    server = await task
    server.close()
    await server.wait_closed()
    with pytest.raises(DeadlineExceeded):
        await transport.connect(f"unix://{tmp_path}/never.sock", timeout=0.2)


async def test_handshake_rejects_garbage() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"ERR no such port\n")

    class W:
        def write(self, data: bytes) -> None:
            self.data = data

        async def drain(self) -> None:
            pass

    with pytest.raises(AgentError):
        await transport.hybrid_handshake(reader, W(), 5)  # type: ignore[arg-type]


async def test_silent_agent_times_out_cleanly(tmp_path: Path) -> None:
    """A peer that accepts and reads but never answers: calls end in DeadlineExceeded and the
    client stays usable/closable; wait_ready gives up at its deadline."""
    path = str(tmp_path / "silent.sock")
    received: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(len(data))
        writer.close()

    server = await asyncio.start_unix_server(handle, path)
    client = AgentClient(f"unix://{path}", connect_timeout=2)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeadlineExceeded):
            await client.wait_ready(0.5, attempt_timeout=0.2)
        assert loop.time() - t0 < 2
        with pytest.raises(DeadlineExceeded):
            await client._call("grpc.AgentService", "ListRoutes", agent_pb2.ListRoutesRequest(),
                               agent_pb2.Routes, timeout=0.2)
        assert received
        assert client.connected
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert not client.connected
