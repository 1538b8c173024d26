"""QEMU memory: the virtio-mem and balloon argv, and MemoryMixin over a scripted QMP server that
plays a guest (virtio-mem ``size`` follows ``requested-size`` with MEMORY_DEVICE_SIZE_CHANGE, or
never), balloon statistics and VFIO disabling balloon reclaim."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from hypervisor.base import VfioDevice, VmConfig
from hypervisor.qemu import cmdline
from hypervisor.qemu.driver import QemuHypervisor
from hypervisor.qemu.hotplug import Plugged
from hypervisor.qemu.memory import BALLOON_PATH, VIRTIO_MEM_PATH
from hypervisor.qemu.monitor import QmpMonitor
from hypervisor.qemu.options import QemuOptions
from tests.unit.hypervisor.test_qemu_monitor import FakeQmp

MIB = 1 << 20


def vm_cfg(tmp: str = "/run/kata-colo/sbs/m1/vm", **opts: Any) -> VmConfig:
    mem = {k: opts.pop(k) for k in ("memory_mib", "max_memory_mib") if k in opts}
    return VmConfig(vm_id="m1", state_dir=tmp, kernel="/img/vmlinux", hypervisor_path="/bin/true",
                    memory_mib=mem.get("memory_mib", 512), max_memory_mib=mem.get("max_memory_mib", 1024),
                    options=QemuOptions(**opts))


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_virtio_mem_argv() -> None:
    argv = cmdline.build_argv(vm_cfg(enable_virtio_mem=True, memory_slots=0), "tcg")
    assert opt(argv, "-m") == ["512M,maxmem=1024M"]
    assert "memory-backend-ram,id=vmem0-ram,size=512M,reserve=off" in opt(argv, "-object")
    assert ("virtio-mem-pci,id=vmem0,memdev=vmem0-ram,block-size=2M,requested-size=0"
            in opt(argv, "-device"))
    # block-aligned: 1000 MiB of headroom with 128 MiB blocks = 896 MiB
    argv = cmdline.build_argv(vm_cfg(enable_virtio_mem=True, virtio_mem_block_mib=128, max_memory_mib=1512), "tcg")
    assert "memory-backend-ram,id=vmem0-ram,size=896M,reserve=off" in opt(argv, "-object")
    # no headroom: no device, plain -m
    argv = cmdline.build_argv(vm_cfg(enable_virtio_mem=True, max_memory_mib=0), "tcg")
    assert opt(argv, "-m") == ["512M"] and not any("virtio-mem" in d for d in opt(argv, "-device"))


def test_balloon_free_page_reporting_and_dimm_argv() -> None:
    argv = cmdline.build_argv(vm_cfg(reclaim_guest_freed_memory=True), "tcg")
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on" in opt(argv, "-device")
    assert opt(argv, "-m") == ["512M,slots=10,maxmem=1024M"]
    argv = cmdline.build_argv(vm_cfg(), "tcg")
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on" in opt(argv, "-device")


@pytest.mark.parametrize("opts, fragment", [
    (dict(memory_slots=0), "enable_virtio_mem"),
    (dict(enable_virtio_mem=True, max_memory_mib=513, virtio_mem_block_mib=4), "one 4 MiB block"),
])
def test_invalid_memory_configs(opts: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        cmdline.build_argv(vm_cfg(**opts), "tcg")


def test_block_size_option_is_validated() -> None:
    from common.errors import ConfigError
    with pytest.raises(ConfigError, match="virtio_mem_block_mib"):
        QemuOptions(virtio_mem_block_mib=3).validate()


class GuestQmp(FakeQmp):
    """FakeQmp answering memory commands like QEMU with a guest behind them."""

    def __init__(self, path: str, *, boot: int = 512, vmem_max: int = 512) -> None:
        super().__init__(path)
        self.boot, self.vmem_max = boot * MIB, vmem_max * MIB
        self.size = 0
        self.requested = 0
        self.stuck = False
        self.balloon_value = self.boot
        self.stats: dict[str, Any] = {"stats": {"stat-available-memory": 300 * MIB, "stat-free-memory": -1,
                                                "stat-total-memory": 400 * MIB}, "last-update": 1700}
        self.replies.update({"qom-get": self._qom_get, "qom-set": self._qom_set,
                             "query-balloon": self._query_balloon, "balloon": self._balloon})

    async def _qom_get(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["path"] == VIRTIO_MEM_PATH and args["property"] == "size":
            return {"return": self.size}
        if args["path"] == BALLOON_PATH and args["property"] == "guest-stats":
            return {"return": self.stats}
        return {"error": {"class": "GenericError", "desc": f"no property {args['property']}"}}

    async def _qom_set(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["path"] == VIRTIO_MEM_PATH and args["property"] == "requested-size":
            self.requested = int(args["value"])
            if not self.stuck:
                asyncio.get_running_loop().create_task(self._guest_follows())
        return {"return": {}}

    async def _guest_follows(self) -> None:
        while self.size != self.requested:
            await asyncio.sleep(0.05)
            step = 128 * MIB
            self.size = min(self.requested, self.size + step) if self.size < self.requested \
                else max(self.requested, self.size - step)
            await self.event("MEMORY_DEVICE_SIZE_CHANGE", {"id": "vmem0", "size": self.size,
                                                           "qom-path": VIRTIO_MEM_PATH})

    async def _query_balloon(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"return": {"actual": min(self.balloon_value, self.boot)}}  # QEMU: boot RAM + DIMMs only

    async def _balloon(self, args: dict[str, Any]) -> dict[str, Any]:
        self.balloon_value = int(args["value"])
        return {"return": {}}


@pytest.fixture
async def qemu(tmp_path: Any) -> AsyncIterator[tuple[QemuHypervisor, GuestQmp]]:
    fake = GuestQmp(str(tmp_path / "qmp.sock"))
    await fake.start()
    hv = QemuHypervisor()
    await hv.prepare(vm_cfg(str(tmp_path / "vm"), enable_virtio_mem=True))
    mon = QmpMonitor(fake.path)
    await mon.connect(timeout=5)
    hv._monitor = mon
    yield hv, fake
    await mon.close()
    await fake.close()


async def test_virtio_mem_grows_and_shrinks_and_waits_for_the_guest(qemu: tuple[QemuHypervisor, GuestQmp]) -> None:
    hv, fake = qemu
    assert hv.memory_mechanisms() == ("virtio-mem", "balloon")
    info = await hv.memory_info()
    assert (info.boot, info.plugged, info.max, info.block) == (512 * MIB, 0, 1024 * MIB, 2 * MIB)
    assert await hv.resize_memory(1000, timeout=5) == 1000  # 488 MiB = 244 blocks of 2 MiB
    assert fake.requested == fake.size == 488 * MIB
    assert (await hv.memory_info()).plugged == 488 * MIB
    assert await hv.resize_memory(513, timeout=5) == 514  # rounded up to a block
    assert await hv.resize_memory(512, timeout=5) == 512
    with pytest.raises(InvalidArgument, match="outside 512..1024"):
        await hv.resize_memory(2000)


async def test_virtio_mem_timeout_withdraws_the_request(qemu: tuple[QemuHypervisor, GuestQmp]) -> None:
    hv, fake = qemu
    await hv.resize_memory(1024, timeout=5)
    fake.stuck = True
    with pytest.raises(DeadlineExceeded, match="unplugged only to 1024 MiB of 600 MiB"):
        await hv.resize_memory(600, timeout=0.3)
    assert fake.requested == fake.size == 512 * MIB  # withdrawn to what the guest has


async def test_balloon_target_stats_and_vfio(qemu: tuple[QemuHypervisor, GuestQmp]) -> None:
    hv, fake = qemu
    await hv.balloon(400 * MIB)
    info = await hv.balloon_info()
    assert info.actual_bytes == 400 * MIB
    # -1 (unreported) dropped; polling enabled once
    assert info.stats == {"stat-available-memory": 300 * MIB, "stat-total-memory": 400 * MIB, "last-update": 1700}
    await hv.balloon_info()
    sets = [m["arguments"] for m in fake.received if m["execute"] == "qom-set"]
    assert sets == [{"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": 2}]
    assert (await hv.memory_info()).ballooned == 112 * MIB
    with pytest.raises(InvalidArgument):
        await hv.balloon(0)
    # with virtio-mem memory plugged, QEMU's balloon value leaves it out; the driver speaks totals
    await hv.resize_memory(768, timeout=5)
    await hv.balloon(600 * MIB)
    assert fake.balloon_value == 344 * MIB
    assert (await hv.balloon_info()).actual_bytes == 600 * MIB
    mi = await hv.memory_info()
    assert (mi.plugged, mi.ballooned, mi.usable) == (256 * MIB, 168 * MIB, 600 * MIB)
    await hv.balloon(768 * MIB)
    await hv.resize_memory(512, timeout=5)
    # a VFIO device (hot-plugged here) makes balloon inflation useless: not a mechanism any more
    hv._devices["nvme0"] = Plugged("vfio", "rp0", "")
    assert hv.memory_mechanisms() == ("virtio-mem",)
    with pytest.raises(FailedPrecondition, match="VFIO"):
        await hv.balloon(300 * MIB)
    assert (await hv.balloon_info()).actual_bytes == 512 * MIB  # the device and its statistics stay


async def test_cold_plugged_vfio_and_no_hotplug(tmp_path: Any) -> None:
    hv = QemuHypervisor()
    cfg = dataclasses.replace(vm_cfg(str(tmp_path / "vm"), pcie_root_ports=1), max_memory_mib=0,
                              vfio=(VfioDevice("h0", "0000:3b:00.0"),))
    await hv.prepare(cfg)
    assert hv.memory_mechanisms() == ()
    with pytest.raises(FailedPrecondition):
        hv._monitor = None
        await hv.resize_memory(512)
