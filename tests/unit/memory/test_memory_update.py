"""containerd Update with a memory limit grows the sandbox as kata's updateResources does
(``default_memory`` + Σ container limits), the memory configuration keys, and the defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError, InvalidArgument
from shim import config
from shim.backend import BackendContext, Stdio
from shim.config import MemoryConfig
from shim.resources.manager import ResourceContext
from shim.resources.memory import MemoryLimitError, MemoryResource
from shim.sandbox.containers import ContainerOps, _Container, _Proc, memory_limit
from shim.sandbox.sandbox import Sandbox, State
from tests.unit.memory.sim import MIB, SimAgent, SimVm

REPO = Path(__file__).resolve().parents[3]


class Guest:
    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, Any]]] = []

    async def update_container(self, cid: str, resources: dict[str, Any]) -> None:
        self.updates.append((cid, resources))


class GrowingSandbox:
    """What ContainerOps.update uses of the Sandbox."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.guest = Guest()
        self.grown: list[int] = []
        self.fail = fail

    def require_agent(self) -> Guest:
        return self.guest

    async def grow_memory_for_containers(self, limits: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.grown.append(limits)


def ops_with(sandbox: GrowingSandbox, *cids: str) -> ContainerOps:
    ops = ContainerOps(sandbox)  # type: ignore[arg-type]
    for cid in cids:
        ops.containers[cid] = _Container(cid, f"/b/{cid}", {"": _Proc(Stdio(), {})})
    return ops


def test_memory_limit_of_oci_resources() -> None:
    assert memory_limit({"memory": {"limit": 256 * MIB}}) == 256 * MIB
    assert memory_limit({"memory": {"limit": -1}}) == 0  # unlimited
    assert memory_limit({"cpu": {"shares": 2}}) is None and memory_limit({}) is None
    with pytest.raises(InvalidArgument):
        memory_limit({"memory": {"limit": "256M"}})


async def test_update_grows_to_the_sum_of_limits_before_the_guest_applies_it() -> None:
    sb = GrowingSandbox()
    ops = ops_with(sb, "pause", "a", "b")
    ops.memory_limits["a"] = 128 * MIB  # from its create spec
    await ops.update("b", {"memory": {"limit": 256 * MIB}}, {})
    assert sb.grown == [384 * MIB] and sb.guest.updates == [("b", {"memory": {"limit": 256 * MIB}})]
    await ops.update("b", {"cpu": {"shares": 10}}, {})  # no memory: no resize
    assert sb.grown == [384 * MIB] and ops.memory_limits == {"a": 128 * MIB, "b": 256 * MIB}


async def test_update_the_vm_cannot_take_fails_before_the_guest_changes() -> None:
    sb = GrowingSandbox(fail=InvalidArgument("over the maximum"))
    ops = ops_with(sb, "a")
    with pytest.raises(InvalidArgument, match="maximum"):
        await ops.update("a", {"memory": {"limit": 64 << 30}}, {})
    assert sb.guest.updates == [] and ops.memory_limits == {}


async def sandbox_with_memory(tmp_path: Path, *, static: bool = False, mechanisms: tuple[str, ...] = ("virtio-mem",
                                                                                                   "balloon")
                              ) -> tuple[Sandbox, SimVm, MemoryResource]:
    vm = SimVm(mechanisms=mechanisms)
    vm.start()
    toml = f"[runtime]\nstatic_sandbox_resource_mgmt = {str(static).lower()}\n[hypervisor.qemu]\ndefault_memory = 512\n"
    cfg = config.parse(toml)
    ctx = ResourceContext(sandbox_id="sb", state_dir=tmp_path, config=cfg, spec={}, hypervisor=vm,
                          agent=SimAgent(vm))
    res = MemoryResource.for_sandbox(ctx)
    assert res is not None
    await res.after_boot(ctx)
    sb = Sandbox(BackendContext(namespace="default", sandbox_id="sb", state_dir=str(tmp_path)))
    sb.cfg, sb.state, sb.agent = cfg, State.RUNNING, ctx.agent
    sb.resource = lambda kind: res if kind == "memory" else None  # type: ignore[method-assign]
    return sb, vm, res


async def test_sandbox_grows_to_default_memory_plus_limits_and_never_shrinks(tmp_path: Path) -> None:
    sb, vm, res = await sandbox_with_memory(tmp_path)
    try:
        await sb.grow_memory_for_containers(256 * MIB)
        assert res.target == 768 * MIB and vm.plugged == 256
        await sb.grow_memory_for_containers(64 * MIB)  # less than it has: unchanged
        assert res.target == 768 * MIB and vm.calls == [("resize_memory", 768)]
        with pytest.raises(MemoryLimitError, match="over the maximum"):
            await sb.grow_memory_for_containers(4096 * MIB)
    finally:
        await vm.close()


async def test_static_resource_mgmt_or_no_hotplug_leaves_the_vm_alone(tmp_path: Path) -> None:
    for kw in ({"static": True}, {"mechanisms": ("balloon",)}):
        sb, vm, res = await sandbox_with_memory(tmp_path, **kw)  # type: ignore[arg-type]
        try:
            await sb.grow_memory_for_containers(256 * MIB)
            assert vm.calls == [] and res.target == 512 * MIB
        finally:
            await vm.close()


def test_memory_config_keys() -> None:
    cfg = config.parse("[colo.memory]\nreserve_mib = 100\nmin_mib = 300\nresize_timeout = 5\n"
                       "[hypervisor.qemu]\nenable_virtio_mem = true\nreclaim_guest_freed_memory = true\n"
                       "virtio_mem_block_mib = 4\n[runtime]\nstatic_sandbox_resource_mgmt = true\n")
    assert cfg.colo.memory == MemoryConfig(reserve_mib=100, min_mib=300, resize_timeout=5.0)
    opts = cfg.hypervisor.options
    assert opts.enable_virtio_mem and opts.reclaim_guest_freed_memory and opts.virtio_mem_block_mib == 4
    assert cfg.runtime.static_sandbox_resource_mgmt
    for bad, fragment in (("[colo.memory]\nreserve = 1\n", "unknown key colo.memory.reserve"),
                          ("[colo.memory]\nmin_mib = 10\n", "min_mib"),
                          ("[colo.memory]\nresize_timeout = 0\n", "resize_timeout"),
                          ("[colo.memory]\nreserve_mib = \"64M\"\n", "wrong type"),
                          ("[hypervisor.qemu]\nvirtio_mem_block_mib = 3\n", "virtio_mem_block_mib")):
        with pytest.raises(ConfigError, match=fragment):
            config.parse(bad)


def test_shipped_defaults_document_the_memory_keys() -> None:
    text = (REPO / "shim" / "defaults" / "configuration.toml").read_text()
    for key in ("enable_virtio_mem", "reclaim_guest_freed_memory", "virtio_mem_block_mib", "[colo.memory]",
                "reserve_mib", "min_mib", "resize_timeout", "static_sandbox_resource_mgmt"):
        assert key in text, key
    cfg = config.load(str(REPO / "shim" / "defaults" / "configuration.toml"))
    assert cfg.colo.memory == MemoryConfig() and not cfg.hypervisor.options.enable_virtio_mem
