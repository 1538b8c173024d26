"""The virtio-serial serve loop, with a pty standing in for the port (both are character
devices): the agent serves a connection, survives the host hanging up, serves the next one,
and waits (never spins) while the port is missing."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent_api.agent import server as agent_server
from agent_api.agent.agent_config import AgentConfig
from agent_api.agent.server import Agent
from proto.kata import health_pb2
from ttrpc import Client, open_fd_stream


class FakePort:
    """A raw pty: the agent opens the slave by path, the test is the host on the master."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no line discipline between the ttrpc frames
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def ports(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    state: dict[str, object] = {"port": None, "lookups": 0}

    def find(name: str, root: str = "") -> str | None:
        assert name == "agent.channel.0"
        state["lookups"] = int(state["lookups"]) + 1  # type: ignore[call-overload]
        port = state["port"]
        return port.path if isinstance(port, FakePort) else None

    monkeypatch.setattr(agent_server, "find_serial_port", find)
    yield state
    port = state["port"]
    if isinstance(port, FakePort):
        port.close()


@pytest.fixture
async def agent(tmp_path: Path, ports: dict[str, object]) -> AsyncIterator[Agent]:
    cfg = dataclasses.replace(AgentConfig(), state_dir=str(tmp_path / "state"),
                              runc="/nonexistent/runc", shared_dir=str(tmp_path / "shared"),
                              use_serial=True, use_vsock=False,
                              cgroup_parent="/kata-colo-unit-none")
    a = Agent(cfg, subreaper=False)
    await a.start()
    yield a
    await a.close()


async def check_over(port: FakePort) -> None:
    reader, writer = await open_fd_stream(port.master)
    client = Client(reader, writer)
    try:
        resp = await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                                 health_pb2.HealthCheckResponse, timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await client.close()


async def test_missing_port_is_polled_slowly(agent: Agent, ports: dict[str, object]) -> None:
    await asyncio.sleep(1.5)
    assert 1 <= int(ports["lookups"]) <= 3  # type: ignore[call-overload]
    # the port appearing later is picked up
    port = FakePort()
    ports["port"] = port
    async with asyncio.timeout(10):
        await check_over(port)


async def test_serves_again_after_host_hangs_up(agent: Agent, ports: dict[str, object]) -> None:
    first = FakePort()
    ports["port"] = first
    async with asyncio.timeout(10):
        await check_over(first)
    lookups = int(ports["lookups"])  # type: ignore[call-overload]
    first.close()  # the host side goes away: the agent's reads fail/hit EOF
    second = FakePort()
    ports["port"] = second
    async with asyncio.timeout(10):
        await check_over(second)
    assert int(ports["lookups"]) > lookups  # type: ignore[call-overload]
    # host gone and the port unusable (its node vanished with the master): retries are paced
    second.close()
    await asyncio.sleep(0.2)
    before = int(ports["lookups"])  # type: ignore[call-overload]
    await asyncio.sleep(1.2)
    assert 1 <= int(ports["lookups"]) - before <= 3  # type: ignore[call-overload]
