"""Planning a container's storage: block rootfs from cached layers (cold or hot), the devmapper
snapshot passed as is, 9p fallbacks with reasons, data disks, and what the guest is told."""
import dataclasses
import os
import shutil

import pytest

from common import guest_storage as gs
from shim import config as cfgmod
from shim.backend import Mount
from shim.resources.blockdev import plan as plan_mod
from shim.resources.blockdev.cache import LayerCache
from shim.sandbox import oci_guest

needs_erofs = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")


def _cfg(tmp_path, **storage):
    cfg = cfgmod.Config()
    st = dataclasses.replace(cfg.storage, scratch_dir=str(tmp_path / "scratch"), claims_dir=str(tmp_path / "claims"),
                             direct_volumes_dir=str(tmp_path / "dv"), **storage)
    return dataclasses.replace(cfg, storage=st)


def _overlay(tmp_path):
    lower = tmp_path / "snap/1/fs"
    lower.mkdir(parents=True)
    (lower / "bin").mkdir()
    up, work = tmp_path / "snap/2/fs", tmp_path / "snap/2/work"
    up.mkdir(parents=True)
    work.mkdir()
    return (Mount("overlay", "overlay", options=(f"lowerdir={lower}", f"upperdir={up}", f"workdir={work}")),)


@needs_erofs
async def test_block_rootfs_cold_then_cached(tmp_path):
    cfg = _cfg(tmp_path)
    cache = LayerCache(tmp_path / "cache", 64 << 20)
    rootfs = _overlay(tmp_path)
    p1 = await plan_mod.make_plan(cfg, "sb", "c1", rootfs, {"process": {}}, cold=True, hotplug=(), cache=cache)
    assert p1.rootfs_mode == "block" and p1.lowers == 1 and p1.cache_hits == 0
    roles = [(d.role, d.dev.readonly, d.dev.driver) for d in p1.resource.disks]
    assert roles == [("layer", True, "virtio-blk"), ("scratch", False, "virtio-blk")]
    view = plan_mod.guest_view(p1, "c1")
    assert view.root_path == gs.block_rootfs("c1")
    assert [s["driver"] for s in view.storages] == ["blk", "blk", "overlayfs"]
    assert view.storages[0]["source"].startswith("serial:kl") and view.storages[0]["fstype"] == "erofs"
    p2 = await plan_mod.make_plan(cfg, "sb", "c2", rootfs, {}, cold=False, hotplug=("block",), cache=cache)
    assert p2.cache_hits == 1 and p2.resource.disks[0].dev.path == p1.resource.disks[0].dev.path
    for p in (p1, p2):
        for lease in p.resource.leases:
            lease.release()


async def test_fallbacks_to_9p_say_why(tmp_path):
    cache = LayerCache(tmp_path / "cache", 64 << 20)
    rootfs = _overlay(tmp_path)
    off = dataclasses.replace(_cfg(tmp_path), hypervisor=dataclasses.replace(
        cfgmod.Config().hypervisor, disable_block_device_use=True))
    p = await plan_mod.make_plan(off, "sb", "c1", rootfs, {}, cold=True, hotplug=(), cache=cache)
    assert p.rootfs_mode == "9p" and p.resource is None and "disable_block_device_use" in p.reason
    p = await plan_mod.make_plan(_cfg(tmp_path), "sb", "c2", rootfs, {}, cold=False, hotplug=(), cache=cache)
    assert p.rootfs_mode == "9p" and "pcie_root_ports" in p.reason
    p = await plan_mod.make_plan(_cfg(tmp_path), "sb", "c3", (), {}, cold=True, hotplug=(), cache=cache)
    assert p.rootfs_mode == "9p" and "no rootfs mounts" in p.reason


async def test_devmapper_snapshot_is_passed_as_is(tmp_path):
    loop = next((f"/dev/{n}" for n in ("loop0", "loop1", "loop2") if os.path.exists(f"/dev/{n}")), None)
    if loop is None:
        pytest.skip("no loop device node to stand in for a devmapper snapshot")
    cfg = _cfg(tmp_path)
    p = await plan_mod.make_plan(cfg, "sb", "c1", (Mount("ext4", loop, options=("rw",)),), {}, cold=True,
                                 hotplug=(), cache=LayerCache(tmp_path / "cache", 64 << 20))
    assert p.rootfs_mode == "snapshot"
    assert [(d.role, d.dev.path, d.dev.readonly) for d in p.resource.disks] == [("snapshot", loop, False)]
    view = plan_mod.guest_view(p, "c1")
    assert view.storages == [{"driver": "blk", "source": p.resource.disks[0].dev.id.join(["serial:", ""]),
                              "fstype": "ext4", "options": ["rw"], "mount_point": gs.block_rootfs("c1")}]
    assert p.resource.claims[0][0].startswith("blk-7:")


async def test_data_disk_mount_becomes_a_guest_bind(tmp_path):
    import base64
    import json

    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 8192)
    vol = tmp_path / "vol"
    vol.mkdir()
    dv = tmp_path / "dv" / base64.urlsafe_b64encode(str(vol).encode()).decode()
    dv.mkdir(parents=True)
    (dv / "mountInfo.json").write_text(json.dumps({"device": str(img), "fstype": "ext4"}))
    spec = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"},
            "mounts": [{"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind", "rw"]}],
            "linux": {}}
    p = await plan_mod.make_plan(_cfg(tmp_path), "sb", "c1", (), spec, cold=False, hotplug=("block",),
                                 cache=LayerCache(tmp_path / "cache", 64 << 20))
    assert p.rootfs_mode == "9p" and [d.dev.driver for d in p.resource.disks] == ["nvme"]
    view = plan_mod.guest_view(p, "c1")
    assert view.storages[0]["driver"] == "nvme" and view.storages[0]["mount_point"].startswith(gs.GUEST_VOLUME_DIR)
    guest = oci_guest.to_guest(spec, "c1", "/run/kata-containers/shared/containers/c1/rootfs",
                               lambda *a: pytest.fail("a disk volume must not go through the share"),
                               volumes=view.volumes, keep_devices=view.keep_devices)
    assert guest["mounts"] == [{"destination": "/data", "type": "bind", "source": view.storages[0]["mount_point"],
                                "options": ["rbind", "rw"]}]
