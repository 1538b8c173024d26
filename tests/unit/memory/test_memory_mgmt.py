"""PUT/GET /colo/memory, the memory part of GET /colo/sandbox and /metrics, and ``kata-colo-ctl
mem``, against a running MgmtServer whose sandbox runs the real Sandbox memory methods and
MemoryResource over a simulated VM."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from hypervisor.base import AgentAddress
from shim.config import MemoryConfig
from shim.mgmt.server import MgmtServer
from shim.mgmt.sizes import format_size, parse_size
from shim.resources.manager import ResourceContext
from shim.resources.memory import MemoryResource
from shim.sandbox.sandbox import Sandbox
from tests.unit.memory.sim import MIB, SimAgent, SimVm
from tests.unit.mgmt.conftest import FakeSandbox, table_with

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the peer check admits root only by default")


class SimHv(SimVm):
    name = "sim"
    pid = os.getpid()
    threads = {0: os.getpid()}

    def agent_address(self) -> AgentAddress:
        return AgentAddress("virtio-serial", path="/run/kata-colo/sbs/x/vm/agent.sock")

    def vmm_pid(self) -> int:
        return os.getpid()

    async def vcpu_threads(self) -> dict[int, int]:
        return {0: os.getpid()}


class MemSandbox(FakeSandbox):
    """The mgmt double, its memory operations the real Sandbox's."""

    set_memory = Sandbox.set_memory
    memory_limits = Sandbox.memory_limits
    memory_view = Sandbox.memory_view
    _require_memory = Sandbox._require_memory

    def __init__(self, hv: SimHv, res: MemoryResource, resize_timeout: float) -> None:
        super().__init__("sb-mem", priorities="")
        self.hv = hv  # type: ignore[assignment]
        self._resources["memory"] = res
        self.resources = SimpleNamespace(persist=lambda: None)
        self.cfg = SimpleNamespace(colo=SimpleNamespace(memory=SimpleNamespace(resize_timeout=resize_timeout)))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[MgmtServer, SimHv, MemoryResource]]:
    hv = SimHv()
    hv.start()
    settings = MemoryConfig(resize_timeout=0.5)
    ctx = ResourceContext(sandbox_id="sb-mem", state_dir=tmp_path, config=SimpleNamespace(
        colo=SimpleNamespace(memory=settings)), spec={}, hypervisor=hv, agent=SimAgent(hv))
    res = MemoryResource.for_sandbox(ctx)
    assert res is not None
    await res.after_boot(ctx)
    sandbox = MemSandbox(hv, res, settings.resize_timeout)
    state = tmp_path / "sbs" / sandbox.id
    state.mkdir(parents=True)
    server = MgmtServer(sandbox_id=sandbox.id, state_dir=str(state), sandbox=sandbox, table=table_with(sandbox.id))
    await server.start()
    yield server, hv, res
    await server.close()
    await hv.close()


async def call(server: MgmtServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=server.path)) as s:
        async with s.request(method, f"http://shim{path}", data=data) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def test_put_memory_answers_with_the_size_reached(served: tuple[MgmtServer, SimHv, MemoryResource]) -> None:
    server, hv, res = served
    status, doc = await call(server, "PUT", "/colo/memory", {"target": 1024 * MIB})
    assert status == 200, doc
    assert doc["actual_bytes"] == doc["target_bytes"] == 1024 * MIB and doc["timed_out"] is False
    assert doc["steps"] == ["hotplug 1024 MiB"] and doc["mechanisms"] == ["virtio-mem", "balloon"]
    status, doc = await call(server, "PUT", "/colo/memory", {"target": "600M"})
    assert status == 200 and doc["actual_bytes"] == 600 * MIB and doc["requested_bytes"] == 600 * MIB


async def test_limits_and_bad_bodies_are_400(served: tuple[MgmtServer, SimHv, MemoryResource]) -> None:
    server, hv, res = served
    status, doc = await call(server, "PUT", "/colo/memory", {"target": 64 * MIB})
    assert status == 400 and "under the floor" in doc["error"]
    assert doc["floor_bytes"] == 256 * MIB and doc["max_bytes"] == 1024 * MIB and doc["target_bytes"] == 64 * MIB
    status, doc = await call(server, "PUT", "/colo/memory", {"target": 4096 * MIB})
    assert status == 400 and "over the maximum" in doc["error"] and doc["max_bytes"] == 1024 * MIB
    for body, fragment in ((b"{", "malformed JSON"), ({"size": 1}, "unknown key"), ({}, "missing"),
                           ({"target": True}, "number of bytes"), ({"target": "lots"}, "not a memory size"),
                           ({"target": -5}, "out of range"), ([1], "JSON object")):
        status, doc = await call(server, "PUT", "/colo/memory", body)
        assert status == 400 and fragment in doc["error"], (body, doc)
    assert hv.calls == [] and res.target == 512 * MIB


async def test_a_guest_that_does_not_follow_is_503_with_the_size_reached(
        served: tuple[MgmtServer, SimHv, MemoryResource]) -> None:
    server, hv, res = served
    hv.stuck_balloon = True
    status, doc = await call(server, "PUT", "/colo/memory", {"target": 300 * MIB})
    assert status == 503 and doc["timed_out"] is True and doc["actual_bytes"] == 512 * MIB
    assert doc["target_bytes"] == 300 * MIB and "only down to 512 MiB" in doc["error"]
    status, view = await call(server, "GET", "/colo/sandbox")
    mem = view["memory"]
    assert mem["target_bytes"] == mem["actual_bytes"] == 512 * MIB and mem["resizes"]["timeout"] == 1
    assert mem["last"]["timed_out"] is True and "only down to" in mem["last_error"]


async def test_get_memory_metrics_and_sandbox_view(served: tuple[MgmtServer, SimHv, MemoryResource]) -> None:
    server, hv, res = served
    await call(server, "PUT", "/colo/memory", {"target": 800 * MIB})
    status, doc = await call(server, "GET", "/colo/memory?fresh=1")
    assert status == 200 and doc["target_bytes"] == 800 * MIB and doc["floor_bytes"] == 256 * MIB
    assert doc["guest"]["source"] == "agent" and doc["guest"]["used_bytes"] == 100 * MIB
    assert doc["vmm_pid"] == os.getpid()
    status, text = await call(server, "GET", "/metrics")
    assert 'kata_colo_memory_bytes{item="target"} 838860800' in text
    assert 'kata_colo_memory_bytes{item="floor"} 268435456' in text
    assert 'kata_colo_memory_resizes_total{result="ok"} 1' in text
    assert "kata_colo_memory_last_resize_seconds " in text
    assert 'kata_colo_vm_memory_bytes{item="plugged"} 301989888' in text
    hv.stats = {"stat-available-memory": 600 * MIB}
    status, doc = await call(server, "GET", "/colo/memory")  # not asking the guest: balloon statistics
    assert status == 200 and doc["guest"]["source"] == "balloon" and doc["guest"]["available_bytes"] == 600 * MIB


async def test_no_memory_control_is_409(tmp_path: Path) -> None:
    sandbox = FakeSandbox("sb-nomem", priorities="")
    sandbox.set_memory = Sandbox.set_memory.__get__(sandbox)  # type: ignore[attr-defined]
    sandbox._require_memory = Sandbox._require_memory.__get__(sandbox)  # type: ignore[attr-defined]
    sandbox.resources = SimpleNamespace(persist=lambda: None)  # type: ignore[attr-defined]
    sandbox.cfg = None  # type: ignore[attr-defined]
    state = tmp_path / "sbs" / sandbox.id
    state.mkdir(parents=True)
    server = MgmtServer(sandbox_id=sandbox.id, state_dir=str(state), sandbox=sandbox, table=table_with())
    await server.start()
    try:
        status, doc = await call(server, "PUT", "/colo/memory", {"target": 1 << 30})
        assert status == 409 and "no memory control" in doc["error"]
    finally:
        await server.close()


async def ctl(root: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ctl", "--root", str(root), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": os.getcwd()})
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_ctl_mem_resizes_shows_and_reports_limits(served: tuple[MgmtServer, SimHv, MemoryResource]) -> None:
    server, hv, res = served
    root = Path(server.path).parent.parent
    rc, out, err = await ctl(root, "mem", "sb-m", "768M")  # a unique id prefix is enough
    assert rc == 0, err
    assert out.startswith("memory: 768 MiB reached (target 768 MiB, floor 256 MiB, max 1024 MiB)"), out
    rc, out, err = await ctl(root, "mem", "sb-mem")
    assert rc == 0 and "Memory:     768 MiB (target 768 MiB, floor 256 MiB, max 1024 MiB; virtio-mem, balloon)" in out
    rc, out, err = await ctl(root, "mem", "sb-mem", "--json")
    assert rc == 0 and json.loads(out)["target_bytes"] == 768 * MIB
    rc, out, err = await ctl(root, "mem", "sb-mem", "100M")
    assert rc == 1 and "under the floor" in err and "floor 256M" in err and "max 1G" in err
    rc, out, err = await ctl(root, "mem", "sb-mem", "12parsecs")
    assert rc == 1 and "not a memory size" in err
    rc, out, err = await ctl(root, "status", "sb-mem")
    assert rc == 0 and "Memory:     768 MiB (target 768 MiB" in out and "Last:     768 MiB → 768 MiB" in out


def test_sizes() -> None:
    assert parse_size("1536M") == 1536 * MIB == parse_size("1.5G") == parse_size("1536MiB") == parse_size("1536mb")
    assert parse_size("1073741824") == 1 << 30 == parse_size(1 << 30) == parse_size(" 1 g ")
    assert parse_size("512k") == 512 << 10
    for bad in ("", "M", "1.5", "-1G", "1X", "0", True, 1 << 51):
        with pytest.raises(Exception, match="memory size|whole number|out of range"):
            parse_size(bad)  # type: ignore[arg-type]
    assert (format_size(1536 * MIB), format_size(512 * MIB), format_size(1 << 30), format_size(100)) == \
        ("1.5G", "512M", "1G", "100B")
