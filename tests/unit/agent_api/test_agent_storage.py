"""The agent's container storages: validation (only the container's own paths, known filesystems,
plain options), disk lookup by serial / PCI path / SCSI address on a fake sysfs, device edits."""
import os

import pytest

from agent_api.agent import devices, storage
from common import guest_storage as gs
from common.errors import InvalidArgument
from proto.kata import agent_pb2

C = "c1"
BASE = gs.container_block_dir(C)


def st(**kw):
    return agent_pb2.Storage(**kw)


def _rootfs():
    return [st(driver="blk", source="serial:kl01", fstype="erofs", options=["ro"], mount_point=f"{BASE}/lower/0"),
            st(driver="scsi", source="serial:ks01", fstype="ext4", mount_point=f"{BASE}/scratch"),
            st(driver="overlayfs", source="overlay", fstype="overlay", mount_point=f"{BASE}/rootfs",
               options=[f"lowerdir={BASE}/lower/0", f"upperdir={BASE}/scratch/upper", f"workdir={BASE}/scratch/work"]),
            st(driver="nvme", source="02/00", fstype="ext4", options=["noatime"],
               mount_point=f"{gs.GUEST_VOLUME_DIR}/kv1")]


def test_a_block_rootfs_plan_is_accepted():
    planned = storage.plan(C, _rootfs())
    assert [p.target for p in planned][-2:] == [f"{BASE}/rootfs", f"{gs.GUEST_VOLUME_DIR}/kv1"]
    assert planned[0].flags & 1  # ro → MS_RDONLY
    assert planned[2].data.startswith(f"lowerdir={BASE}/lower/0,upperdir=")


@pytest.mark.parametrize("bad, match", [
    (st(driver="blk", source="serial:x", fstype="ntfs", mount_point=f"{BASE}/lower/0"), "filesystem"),
    (st(driver="blk", source="serial:x", fstype="ext4", mount_point="/etc"), "outside"),
    (st(driver="blk", source="serial:x", fstype="ext4", mount_point=f"{gs.container_block_dir('other')}/x"), "outside"),
    (st(driver="blk", source="/dev/sda", fstype="ext4", mount_point=f"{BASE}/lower/0"), "bad disk source"),
    (st(driver="blk", source="serial:x", fstype="ext4", options=["loop"], mount_point=f"{BASE}/l"), "not allowed"),
    (st(driver="overlayfs", fstype="overlay", mount_point=f"{BASE}/rootfs",
        options=["lowerdir=/etc", f"upperdir={BASE}/u", f"workdir={BASE}/w"]), "outside"),
    (st(driver="overlayfs", fstype="overlay", mount_point=f"{BASE}/rootfs",
        options=[f"lowerdir={BASE}/l", f"upperdir={BASE}/u"]), "exactly"),
    (st(driver="overlayfs", fstype="overlay", mount_point=f"{BASE}/elsewhere",
        options=[f"lowerdir={BASE}/l", f"upperdir={BASE}/u", f"workdir={BASE}/w"]), "must be mounted at"),
    (st(driver="local", source="x", mount_point=f"{BASE}/x"), "unsupported"),
])
def test_bad_storages_are_refused(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        storage.plan(C, [bad])


@pytest.fixture
def fake_sys(tmp_path):
    """vda serial kl01 (virtio-blk), nvme0n1 behind root port 00:02.0 → 01:00.0, sda at 0:0:3:0."""
    s, d = tmp_path / "sys", tmp_path / "dev"
    d.mkdir()
    blockclass = s / "class/block"
    blockclass.mkdir(parents=True)
    (s / "block").mkdir()
    (s / "block/vda").mkdir()
    (s / "block/vda/serial").write_text("kl01")
    rp = s / "devices/pci0000:00/0000:00:02.0"
    ns = rp / "0000:01:00.0/nvme/nvme0/nvme0n1"
    ns.mkdir(parents=True)
    os.symlink(blockclass, ns / "subsystem")
    (rp / "pci_bus/0000:01").mkdir(parents=True)
    (rp / "0000:01:00.0/msi_irqs").mkdir()
    for irq in ("33", "34"):
        (rp / "0000:01:00.0/msi_irqs" / irq).touch()
    pdev = s / "bus/pci/devices"
    pdev.mkdir(parents=True)
    os.symlink(rp, pdev / "0000:00:02.0")
    os.symlink(rp / "0000:01:00.0", pdev / "0000:01:00.0")
    sd = s / "bus/scsi/devices/0:0:3:0/block/sda"
    sd.mkdir(parents=True)
    return devices.SysRoots(str(s), str(d), str(tmp_path / "proc"))


def test_disks_are_found_by_serial_pci_path_and_scsi_address(fake_sys):
    assert devices.resolve_block("serial:kl01", fake_sys) == f"{fake_sys.dev}/vda"
    assert devices.resolve_block("serial:nope", fake_sys) is None
    assert devices.resolve_block("02/00", fake_sys) == f"{fake_sys.dev}/nvme0n1"
    assert devices.resolve_block("03/00", fake_sys) is None
    assert devices.resolve_block("3:0", fake_sys) == f"{fake_sys.dev}/sda"
    with pytest.raises(InvalidArgument):
        devices.resolve_block("../../etc", fake_sys)


async def test_a_disk_that_never_appears_times_out(fake_sys):
    from common.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded, match="did not appear"):
        await devices.wait_block("serial:never", 0.2, fake_sys)


def test_irqs_go_to_the_high_priority_vcpus(fake_sys, tmp_path):
    prio = tmp_path / "prio.json"
    prio.write_text('{"version": 1, "priorities": {"high": [0, 1], "low": [2, 3]}}')
    assert devices.priority_vcpus("high", str(prio)) == [0, 1]
    dev = devices.pci_device_by_path("02/00", fake_sys)
    for irq in (33, 34):
        os.makedirs(f"{fake_sys.proc}/irq/{irq}")
    assert devices.bind_irqs(devices.msi_irqs(dev), [0, 1], fake_sys) == [33, 34]
    assert open(f"{fake_sys.proc}/irq/33/smp_affinity_list").read() == "0,1"
