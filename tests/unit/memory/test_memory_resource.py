"""MemoryResource over a simulated VM: limits, the order of the mechanisms, timeouts that keep
what was reached, the guest told after each resize, the view."""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from shim.config import MemoryConfig
from shim.resources.manager import ResourceContext
from shim.resources.memory import MemoryLimitError, MemoryResource, MemoryTimeout
from tests.unit.memory.sim import MIB, SimAgent, SimVm


async def booted(vm: SimVm, agent: SimAgent, **settings: object) -> MemoryResource:
    cfg = SimpleNamespace(colo=SimpleNamespace(memory=dataclasses.replace(MemoryConfig(), **settings)))
    ctx = ResourceContext(sandbox_id="sb-mem", state_dir=Path("/nonexistent"), config=cfg, spec={}, hypervisor=vm)
    res = MemoryResource.for_sandbox(ctx)
    assert res is not None
    ctx.agent = agent
    await res.after_boot(ctx)
    return res


@pytest.fixture
async def vm() -> AsyncIterator[SimVm]:
    v = SimVm()
    v.start()
    yield v
    await v.close()


async def test_for_sandbox_needs_memory_control() -> None:
    ctx = ResourceContext(sandbox_id="x", state_dir=Path("/nonexistent"), config=None, spec={}, hypervisor=object())
    assert MemoryResource.for_sandbox(ctx) is None


async def test_after_boot_takes_the_size_and_tells_the_guest(vm: SimVm) -> None:
    agent = SimAgent(vm)
    res = await booted(vm, agent)
    assert res.target == 512 * MIB
    told = agent.told[-1]
    assert told["usable"] == told["target"] == 512 * MIB and told["maximum"] == 1024 * MIB
    assert told["floor"] == 256 * MIB  # guest used 100 + reserve 64 < [colo.memory] min_mib 256
    assert told["mechanisms"] == ("virtio-mem", "balloon")
    assert res.record() == {"sandbox_id": "sb-mem", "target_bytes": 512 * MIB}


async def test_grow_plugs_then_shrink_unplugs(vm: SimVm) -> None:
    agent = SimAgent(vm)
    res = await booted(vm, agent)
    r = await res.resize(1024 * MIB)
    assert (r.target, r.actual, r.timed_out) == (1024 * MIB, 1024 * MIB, False)
    assert vm.calls == [("resize_memory", 1024)] and vm.plugged == 512
    vm.calls.clear()
    r = await res.resize(512 * MIB)
    assert r.actual == 512 * MIB and vm.plugged == 0 and vm.calls == [("resize_memory", 512)]
    assert agent.told[-1]["usable"] == agent.told[-1]["target"] == 512 * MIB
    assert res.counts["ok"] == 2


async def test_shrink_below_boot_uses_the_balloon_and_grow_deflates_first(vm: SimVm) -> None:
    res = await booted(vm, SimAgent(vm, used_mib=100))
    await res.resize(1024 * MIB)
    vm.calls.clear()
    r = await res.resize(400 * MIB)
    assert vm.calls == [("resize_memory", 512), ("balloon", 400)]
    assert r.actual == 400 * MIB and r.steps == ["hotplug 512 MiB", "balloon 400 MiB"]
    vm.calls.clear()
    r = await res.resize(900 * MIB)
    assert vm.calls == [("balloon", 512), ("resize_memory", 900)]  # 900 is whole blocks: no rounding to inflate
    assert r.actual == 900 * MIB and vm.plugged == 388


async def test_under_the_floor_and_over_the_max_are_refused_with_limits_and_change_nothing(vm: SimVm) -> None:
    res = await booted(vm, SimAgent(vm, used_mib=300), reserve_mib=64)
    await res.resize(1024 * MIB)
    vm.calls.clear()
    with pytest.raises(MemoryLimitError) as low:
        await res.resize(300 * MIB)
    assert low.value.limits.floor == 364 * MIB and low.value.limits.max == 1024 * MIB
    with pytest.raises(MemoryLimitError, match="over the maximum"):
        await res.resize(2048 * MIB)
    assert vm.calls == [] and res.target == 1024 * MIB and res.counts["refused"] == 2


async def test_a_guest_that_does_not_give_memory_back_times_out_and_keeps_what_it_reached(vm: SimVm) -> None:
    agent = SimAgent(vm)
    res = await booted(vm, agent, resize_timeout=0.5)
    vm.stuck_balloon = True
    with pytest.raises(MemoryTimeout, match="only down to 512 MiB") as err:
        await res.resize(300 * MIB)
    assert err.value.actual == 512 * MIB and err.value.target == 300 * MIB
    assert vm.calls[-1] == ("balloon", 512)  # the request was withdrawn to what the guest had
    assert res.target == 512 * MIB and res.counts["timeout"] == 1
    assert res.last is not None and res.last.timed_out and "only down to" in res.last_error
    assert agent.told[-1]["target"] == 512 * MIB  # the guest sees the size it really has
    vm.stuck_balloon = False
    assert (await res.resize(300 * MIB)).actual == 300 * MIB and res.last_error == ""


async def test_a_virtio_mem_unplug_the_guest_cannot_finish_is_completed_by_the_balloon(vm: SimVm) -> None:
    res = await booted(vm, SimAgent(vm), resize_timeout=1.0)
    await res.resize(1024 * MIB)
    vm.stuck_unplug = True
    r = await res.resize(600 * MIB)
    assert r.actual == 600 * MIB and vm.plugged == 512 and r.steps[0] == "hotplug stopped at 1024 MiB"
    assert ("balloon", 600) in vm.calls


async def test_without_a_balloon_a_stuck_unplug_is_a_timeout(vm: SimVm) -> None:
    vm.mech = ("virtio-mem",)
    res = await booted(vm, SimAgent(vm), resize_timeout=0.3)
    await res.resize(1024 * MIB)
    vm.stuck_unplug = True
    with pytest.raises(MemoryTimeout) as err:
        await res.resize(600 * MIB)
    assert err.value.actual == 1024 * MIB and res.target == 1024 * MIB


async def test_floor_falls_back_to_balloon_stats_then_refuses_blind_shrinks(vm: SimVm) -> None:
    agent = SimAgent(vm)
    res = await booted(vm, agent)
    agent.fail = True
    vm.stats = {"stat-available-memory": 400 * MIB}
    _, lim = await res.limits()
    assert lim.source == "balloon" and lim.floor == 256 * MIB  # 512 − 400 + 64 < min 256
    vm.stats = {}
    res.guest_at = 0.0  # the last agent answer is old
    _, lim = await res.limits()
    assert lim.source == "none" and lim.floor == 512 * MIB
    with pytest.raises(MemoryLimitError, match="unknown"):
        await res.resize(400 * MIB)


async def test_a_lying_guest_is_bounded(vm: SimVm) -> None:
    agent = SimAgent(vm)
    res = await booted(vm, agent)
    agent.lie = {"available_bytes": 1 << 62, "total_bytes": -5, "free_bytes": "x"}
    _, lim = await res.limits()
    assert lim.used == 0 and lim.floor == 256 * MIB
    assert res.guest["total_bytes"] == 0 and res.guest["free_bytes"] == 0


async def test_view_reads_no_guest_and_shows_target_and_counts(vm: SimVm) -> None:
    agent = SimAgent(vm)
    res = await booted(vm, agent)
    await res.resize(800 * MIB)
    agent.hang = True  # the view never asks the guest
    doc = await res.view()
    assert doc["target_bytes"] == doc["actual_bytes"] == 800 * MIB
    assert doc["plugged_bytes"] == 288 * MIB and doc["mechanisms"] == ["virtio-mem", "balloon"]
    assert doc["resizes"]["ok"] == 1 and doc["last"]["steps"] == ["hotplug 800 MiB"]
    assert doc["guest"]["source"] == "agent" and doc["guest"]["available_bytes"] == 700 * MIB
    assert doc["balloon"]["actual_bytes"] == 800 * MIB
