"""Fixtures for the management plane: a sandbox handle double whose QoS part is the real
:class:`~shim.resources.qos.resource.QosResource` over an in-memory cgroup driver, a guest agent
double, and a running :class:`~shim.mgmt.server.MgmtServer` on a temporary socket.

The double has the attributes the management server reads from
:class:`shim.sandbox.sandbox.Sandbox` (state, running, hv, vmm_pid(), resource(), require_agent(),
set_vcpu_priority(), update_priority_knobs(), started_at); the guest double answers GetMetrics,
StatsContainer, SetVcpuPriorities and Debug/Exec, and can be made to hang or fail.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import FailedPrecondition, Unimplemented
from hypervisor.base import AgentAddress, BalloonInfo, MemoryInfo
from proto.kata_colo import debug_pb2
from shim.backend import Stats, Stdio
from shim.mgmt.server import MgmtServer
from shim.process import Container, Process, ProcessTable, Status
from shim.resources.qos.driver import CgroupDriver, Location
from shim.resources.qos.manager import QosManager
from shim.resources.qos.model import CpuKnobs, from_tables
from shim.resources.qos.resource import QosResource
from shim.sandbox.sandbox import State

GUEST_TEXT = """# HELP kata_guest_meminfo Statistics about memory usage in the system.
# TYPE kata_guest_meminfo gauge
kata_guest_meminfo{item="mem_total"} 536870912
kata_guest_meminfo{item="mem_free"} 268435456
# HELP kata_agent_scrape_count Metrics scrape count
# TYPE kata_agent_scrape_count counter
kata_agent_scrape_count 3
"""


class MemDriver(CgroupDriver):
    """cgroup driver over a dict: groups, their files (knobs as the v1 driver names them)."""

    version = 1

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, str]] = {"": {}}
        self.usage: dict[str, int] = {}
        self.lock = threading.Lock()

    def exists(self, rel: str) -> bool:
        return rel in self.groups

    def create(self, rel: str, threaded: bool = False) -> bool:
        if rel in self.groups:
            return False
        self.groups[rel] = {"cpuset.cpus": "0-1",
                            "cpu.stat": "nr_periods 10\nnr_throttled 4\nthrottled_time 2500000000"}
        return True

    def set_knobs(self, rel: str, knobs: CpuKnobs) -> None:
        files = self.groups[rel]
        for key, name in (("shares", "cpu.shares"), ("cfs_quota_us", "cpu.cfs_quota_us"),
                          ("cfs_period_us", "cpu.cfs_period_us"), ("burst", "cpu.cfs_burst_us")):
            value = getattr(knobs, key)
            if value is not None:
                files[name] = str(value)
        if knobs.cpu_idle is not None:
            files["cpu.idle"] = "1" if knobs.cpu_idle else "0"
        if knobs.cpuset is not None:
            files["cpuset.cpus"] = knobs.cpuset

    def attach_files(self, rel: str) -> tuple[str, ...]:
        return (f"{rel}/tasks",)

    def adopt_process(self, rel: str, pid: int) -> None:
        pass

    def process_location(self, pid: int) -> Location:
        return {"cpu": "/"}

    def restore_process(self, pid: int, location: Location) -> bool:
        return True

    def threads(self, rel: str) -> list[int]:
        return []

    def children(self, rel: str) -> list[str]:
        return [g for g in self.groups if g.startswith(rel + "/") and "/" not in g[len(rel) + 1:]]

    def remove(self, rel: str) -> bool:
        return self.groups.pop(rel, None) is not None

    def evacuate(self, rel: str, to_rel: str) -> None:
        pass

    def group_of(self, tid: int) -> str:
        return ""

    def read(self, rel: str, filename: str) -> str:
        try:
            return self.groups[rel][filename]
        except KeyError:
            raise FileNotFoundError(filename) from None

    def cpu_usage_ns(self, rel: str) -> int:
        return self.usage.get(rel, 7_000_000_000)

    def effective_cpus(self, rel: str) -> tuple[int, ...]:
        return (0, 1)


class FakeHv:
    """Hypervisor double with the MemoryControl capability (its methods are what isinstance
    checks)."""

    name = "fake"

    def __init__(self, pid: int, threads: dict[int, int]) -> None:
        self.pid = pid
        self.threads = threads

    def agent_address(self) -> AgentAddress:
        return AgentAddress("virtio-serial", path="/run/kata-colo/sbs/x/vm/agent.sock")

    def vmm_pid(self) -> int:
        return self.pid

    async def vcpu_threads(self) -> dict[int, int]:
        return dict(self.threads)

    def memory_mechanisms(self) -> tuple[str, ...]:
        return ("balloon",)

    async def memory_info(self) -> MemoryInfo:
        return MemoryInfo(boot=512 << 20, plugged=0, ballooned=64 << 20, max=1024 << 20)

    async def resize_memory(self, target_mib: int) -> int:
        return target_mib

    async def balloon(self, target_bytes: int) -> None:
        pass

    async def balloon_info(self) -> BalloonInfo:
        return BalloonInfo(actual_bytes=448 << 20)


class FakeAgentClient:
    def __init__(self) -> None:
        self.metrics_text = GUEST_TEXT
        self.hang = False
        self.exec_requests: list[tuple[list[str], bytes, int]] = []

    async def _maybe_hang(self) -> None:
        if self.hang:
            await asyncio.sleep(3600)

    async def get_metrics(self) -> str:
        await self._maybe_hang()
        return self.metrics_text

    async def debug_exec(self, argv: list[str], *, stdin: bytes = b"", timeout: int = 30,
                         env: list[str] = ()) -> debug_pb2.ExecResponse:  # type: ignore[assignment]
        await self._maybe_hang()
        self.exec_requests.append((list(argv), stdin, timeout))
        if argv[0] == "missing":
            raise Unimplemented("service kata_colo.v1.Debug: method Exec not implemented")
        return debug_pb2.ExecResponse(exit_code=3, stdout=b"out:" + stdin, stderr=b"err")


class FakeGuest:
    """GuestAgent double (the facade the sandbox holds)."""

    def __init__(self) -> None:
        self.client = FakeAgentClient()
        self.priorities: list[dict[str, list[int]]] = []

    async def set_vcpu_priorities(self, mapping: dict[str, list[int]]) -> None:
        await self.client._maybe_hang()
        self.priorities.append(mapping)

    async def stats(self, container_id: str) -> Stats:
        return Stats(cpu_usage_ns=1_000_000, memory_usage=64 << 20)


class FakeSandbox:
    """What the management server uses of shim.sandbox.sandbox.Sandbox (see the module doc)."""

    def __init__(self, sandbox_id: str = "sb-unit", vcpus: int = 2, priorities: str = "high:1,low:1") -> None:
        self.id = sandbox_id
        self.state = State.RUNNING
        self.started_at = time.time() - 42
        tids = [int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")][:1] * vcpus
        self.hv = FakeHv(os.getpid(), {i: tids[i] for i in range(vcpus)})
        self.agent = FakeGuest()
        self.driver = MemDriver()
        self._resources: dict[str, Any] = {}
        if priorities:
            colo = from_tables({}, {"high": {"cpu_shares": 1024}, "low": {"cpu_shares": 2}}, "kc-unit")
            names = [p.split(":")[0] for p in priorities.split(",") for _ in range(int(p.split(":")[1]))]
            qos = QosResource(sandbox_id, colo, names)
            qos.manager = QosManager(sandbox_id, colo, driver=self.driver, placer=lambda ops: [])
            qos.manager.place(self.hv.threads, os.getpid(), qos.priorities)
            qos.placed = True
            self._resources["qos"] = qos

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    def vmm_pid(self) -> int | None:
        return self.hv.pid if self.running else None

    def resource(self, kind: str) -> Any:
        return self._resources.get(kind)

    def require_agent(self) -> FakeGuest:
        if not self.running:
            raise FailedPrecondition(f"sandbox {self.id} VM is not running")
        return self.agent

    async def set_vcpu_priority(self, vcpu: int, priority: str) -> dict[str, list[int]]:
        qos = self._resources.get("qos")
        if qos is None:
            raise FailedPrecondition(f"sandbox {self.id} has no vCPU priorities")
        mapping: dict[str, list[int]] = await qos.set_vcpu_priority(vcpu, priority, self.require_agent())
        return mapping

    async def update_priority_knobs(self, priority: str, knobs: dict[str, Any]) -> None:
        qos = self._resources.get("qos")
        if qos is None:
            raise FailedPrecondition(f"sandbox {self.id} has no vCPU priorities")
        await qos.update_priority_knobs(priority, knobs)


def table_with(*ids: str) -> ProcessTable:
    table = ProcessTable()
    for cid in ids:
        init = Process(cid, "", f"/bundles/{cid}", Stdio(), pid=4242, status=Status.RUNNING)
        table.add_container(Container(cid, f"/bundles/{cid}", init))
    return table


@pytest.fixture
async def mgmt(tmp_path: Path) -> AsyncIterator[tuple[MgmtServer, FakeSandbox]]:
    sandbox = FakeSandbox()
    state = tmp_path / "sbs" / sandbox.id
    state.mkdir(parents=True)
    server = MgmtServer(sandbox_id=sandbox.id, state_dir=str(state), sandbox=sandbox,
                        table=table_with(sandbox.id, "ctr-a"), debug_console_enabled=True)
    await server.start()
    yield server, sandbox
    sandbox.agent.client.hang = False
    await server.close()
