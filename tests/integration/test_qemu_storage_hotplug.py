"""Storage and VFIO hot-plug against a real QEMU (TCG) running the guest image's kernel (shell
mode): a vfio-pci ``device_add`` QEMU refuses (this host has no VFIO) rolls back and leaves its
root port free; virtio-blk on a root port and a virtio-scsi LUN (no port) plug, report their
guest PCI path / nothing, and unplug on DEVICE_DELETED; a ContainerStorage whose second disk
fails half way is rolled back by the ResourceManager (the first disk unplugged, its scratch disk
deleted); a cold-plugged VFIO device QEMU cannot open fails the boot and leaves nothing."""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from common.errors import HypervisorError
from hypervisor.base import BlockDevice, VfioDevice
from hypervisor.qemu.driver import QemuHypervisor
from hypervisor.qemu.monitor import pci_path
from shim.resources.blockdev.resource import ContainerStorage, Disk
from shim.resources.manager import ResourceContext, ResourceManager, read_journal
from tests.support.qemu import QEMU, assert_nothing_left, needs_image, needs_qemu, vm_config

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]


def _disk(tmp_path: Path, name: str, size: int = 8 << 20) -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


@needs_qemu
@needs_image
async def test_hotplug_rollbacks_and_unplug(tmp_path):
    from hypervisor.qemu.options import QemuOptions

    cfg = vm_config(tmp_path, pcie_root_ports=2)
    cfg = type(cfg)(**{**cfg.__dict__, "options": QemuOptions(accel="tcg", pcie_root_ports=2,
                                                              block_device_driver="virtio-scsi")})
    hv = QemuHypervisor()
    await hv.prepare(cfg)
    await hv.start(timeout=60)
    pid = hv.vmm_pid()
    try:
        # the guest's pciehp must be up to answer unplug requests (TCG boots take seconds)
        for _ in range(600):
            if "kata-colo-init: ready" in hv.console_tail(1 << 16):
                break
            await asyncio.sleep(0.1)
        assert "balloon" in hv.memory_mechanisms()
        with pytest.raises(HypervisorError, match="device_add"):
            await hv.add_device(VfioDevice("kfbad00", "0000:ff:1f.7"))
        buses = await hv.monitor.query_pci()
        assert pci_path(buses, "kfbad00") == "" and hv.vfio_attached() == []
        assert "balloon" in hv.memory_mechanisms()  # nothing pins guest RAM
        blk = await hv.add_device(BlockDevice("kl0", _disk(tmp_path, "l0.img"), readonly=True, serial="kl0"))
        assert blk.guest_pci_path.endswith("/00") and len(blk.guest_pci_path.split("/")) == 2, blk
        assert blk.guest_pci_path == await hv.guest_pci_path("kl0")
        lun = await hv.add_device(BlockDevice("ks0", _disk(tmp_path, "s0.img"), driver="virtio-scsi", serial="ks0"))
        assert lun.guest_pci_path == ""
        with pytest.raises(HypervisorError):  # a missing image: blockdev-add fails, nothing added
            await hv.add_device(BlockDevice("kv0", str(tmp_path / "missing.img"), driver="nvme"))
        await hv.remove_device("ks0", timeout=30)
        await hv.remove_device("kl0", timeout=30)
        buses = await hv.monitor.query_pci()
        assert pci_path(buses, "kl0") == ""
        blocks = [b["node-name"] for b in await hv.monitor.execute("query-named-block-nodes")]
        assert not [b for b in blocks if b.startswith(("kl0", "ks0", "kv0"))], blocks

        # a container's storage failing half way: the manager rolls back what was plugged
        mgr = ResourceManager("sb-it", tmp_path / "state")
        scratch_path = str(tmp_path / "scratch" / "sb-it" / "c1.img")
        res = ContainerStorage("sb-it", "c1", scratch_bytes=64 << 20, claims_dir=str(tmp_path / "claims"), disks=[
            Disk(BlockDevice("ksc1", scratch_path, driver="virtio-blk", serial="ksc1"), "scratch"),
            Disk(BlockDevice("kvc1", str(tmp_path / "gone.img"), driver="nvme", serial="kvc1"), "layer")])
        ctx = ResourceContext("sb-it", tmp_path / "state", None, {}, hv)
        with pytest.raises(HypervisorError):
            await mgr.attach(res, ctx, "storage-c1")
        assert pci_path(await hv.monitor.query_pci(), "ksc1") == ""
        assert not os.path.exists(scratch_path) and res.plugged == []
        assert mgr.get("container-storage") is None and read_journal(mgr.journal_path) == []
    finally:
        await hv.stop(force=True)
        await hv.cleanup()
    assert_nothing_left(cfg, pid)


@needs_qemu
async def test_cold_plugged_vfio_qemu_cannot_open_fails_the_boot_cleanly(tmp_path):
    cfg = vm_config(tmp_path, vfio=(VfioDevice("kf0", "0000:ff:1f.7"),), kernel=shutil.which("true") or "/bin/true")
    hv = QemuHypervisor()
    await hv.prepare(cfg)
    assert "pcie-root-port,id=rpv0,bus=pcie.0,chassis=2,slot=0" in hv.argv
    assert "vfio-pci,id=kf0,host=0000:ff:1f.7,bus=rpv0" in hv.argv
    with pytest.raises(HypervisorError, match="vfio|VFIO|0000:ff:1f.7|exited"):
        await hv.start(timeout=30)
    await hv.cleanup()
    assert_nothing_left(cfg, hv.vmm_pid())
    assert QEMU
