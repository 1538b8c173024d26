"""The sizing rules: limits from the guest's numbers, the checks, the order of the mechanisms."""
from __future__ import annotations

import pytest

from hypervisor.base import MemoryInfo
from shim.resources.memory import plan
from shim.resources.memory.plan import MemoryLimitError, Step

MIB = 1 << 20


def info(boot: int = 512, plugged: int = 0, ballooned: int = 0, max_mib: int = 1024, block: int = 2) -> MemoryInfo:
    return MemoryInfo(boot=boot * MIB, plugged=plugged * MIB, ballooned=ballooned * MIB, max=max_mib * MIB,
                      block=block * MIB)


def test_floor_is_guest_used_plus_reserve_with_the_minimum_below() -> None:
    lim = plan.limits(info(plugged=512), ("virtio-mem", "balloon"), 700 * MIB, reserve_mib=64, min_mib=256)
    assert lim.used == 324 * MIB and lim.floor == 388 * MIB and lim.max == 1024 * MIB
    # an idle guest: the minimum wins
    lim = plan.limits(info(plugged=512), ("virtio-mem", "balloon"), 1000 * MIB, reserve_mib=64, min_mib=256)
    assert lim.floor == 256 * MIB and lim.lowest == 256 * MIB


def test_floor_without_balloon_is_boot_ram_for_virtio_mem_and_the_size_for_dimms() -> None:
    lim = plan.limits(info(plugged=512), ("virtio-mem",), 1000 * MIB, reserve_mib=64, min_mib=256)
    assert lim.floor == lim.lowest == 512 * MIB
    lim = plan.limits(info(plugged=128, block=128), ("dimm",), 600 * MIB, reserve_mib=64, min_mib=256)
    assert lim.floor == lim.lowest == 640 * MIB  # DIMMs are never unplugged


def test_no_hotplug_means_the_maximum_is_what_the_vm_has() -> None:
    lim = plan.limits(info(boot=1024, max_mib=1024, block=0), ("balloon",), 800 * MIB, reserve_mib=64, min_mib=256)
    assert lim.max == 1024 * MIB and lim.floor == 288 * MIB


def test_unknown_or_lying_guest_numbers() -> None:
    lim = plan.limits(info(plugged=512), ("virtio-mem", "balloon"), None, reserve_mib=64, min_mib=256)
    assert lim.floor == 1024 * MIB and lim.used is None and lim.source == "none"  # no shrink blind
    # a guest claiming more available than the VM has is capped: floor = minimum
    lim = plan.limits(info(plugged=512), ("balloon",), 1 << 49, reserve_mib=64, min_mib=256)
    assert lim.used == 0 and lim.floor == 256 * MIB
    # a guest claiming nothing available: the floor is the whole VM, never above it
    lim = plan.limits(info(plugged=512), ("balloon",), 0, reserve_mib=64, min_mib=256)
    assert lim.floor == 1024 * MIB


def test_check_refuses_under_floor_and_over_max_with_the_limits() -> None:
    lim = plan.limits(info(plugged=512), ("virtio-mem", "balloon"), 700 * MIB, reserve_mib=64, min_mib=256)
    with pytest.raises(MemoryLimitError, match="under the floor") as low:
        plan.check(300 * MIB, 1024 * MIB, lim)
    assert low.value.limits.floor == 388 * MIB and low.value.target == 300 * MIB
    with pytest.raises(MemoryLimitError, match="over the maximum"):
        plan.check(1025 * MIB, 1024 * MIB, lim)
    plan.check(388 * MIB, 1024 * MIB, lim)
    plan.check(1024 * MIB, 1024 * MIB, lim)
    # growing is never refused by the floor (a VM already under it may grow)
    high = plan.limits(info(), ("virtio-mem", "balloon"), 0, reserve_mib=64, min_mib=256)
    plan.check(600 * MIB, 512 * MIB, high)


def test_align_rounds_up_to_whole_mib() -> None:
    assert plan.align(512 * MIB + 1) == 513 * MIB
    assert plan.align(512 * MIB) == 512 * MIB


def test_steps_grow_deflates_first_then_plugs() -> None:
    s = plan.steps(1024 * MIB, info(ballooned=200), ("virtio-mem", "balloon"))
    assert s == [Step("balloon", 512 * MIB), Step("hotplug", 1024 * MIB), Step("balloon", 1024 * MIB)]
    assert plan.steps(800 * MIB, info(), ("virtio-mem",)) == [Step("hotplug", 800 * MIB)]
    assert plan.steps(400 * MIB, info(ballooned=200), ("balloon",)) == [Step("balloon", 400 * MIB)]


def test_steps_shrink_unplugs_first_then_inflates() -> None:
    s = plan.steps(400 * MIB, info(plugged=512), ("virtio-mem", "balloon"))
    assert s == [Step("hotplug", 512 * MIB), Step("balloon", 400 * MIB)]
    assert plan.steps(600 * MIB, info(plugged=512), ("virtio-mem",)) == [Step("hotplug", 600 * MIB)]
    # DIMMs are not unplugged: the balloon shrinks
    assert plan.steps(600 * MIB, info(plugged=256, block=128), ("dimm", "balloon")) == [Step("balloon", 600 * MIB)]
    assert plan.balloon_after(600 * MIB, 512 * MIB) == 512 * MIB
