import os

import pytest

from shim import rootfs
from shim.backend import Mount
from common.errors import InvalidArgument

pytestmark = pytest.mark.root


def _overlay(tmp_path):
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "hello").write_text("from lower\n")
    return Mount("overlay", "overlay", "", (f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"))


def test_overlay_mounted_shared_and_released(tmp_path):
    bundle_rootfs = tmp_path / "bundle" / "rootfs"
    assert rootfs.mount_rootfs([_overlay(tmp_path)], bundle_rootfs)
    try:
        assert (bundle_rootfs / "hello").read_text() == "from lower\n"
        share = rootfs.Virtio9pShare(tmp_path / "shared")
        share.prepare()
        guest = share.share_rootfs("c1", bundle_rootfs)
        assert guest == "/run/kata-containers/shared/containers/c1/rootfs"
        assert (tmp_path / "shared" / "c1" / "rootfs" / "hello").exists()
        (bundle_rootfs / "new").write_text("x")  # writes land in upper, visible through the share
        assert (tmp_path / "shared" / "c1" / "rootfs" / "new").exists()
        share.cleanup()
        assert not (tmp_path / "shared").exists()
    finally:
        rootfs.unmount_all(bundle_rootfs)
    assert not rootfs.is_mountpoint(bundle_rootfs)
    assert (tmp_path / "upper" / "new").exists()


def test_no_mounts_means_prepopulated_rootfs(tmp_path):
    assert rootfs.mount_rootfs([], tmp_path / "rootfs") is False


@pytest.mark.parametrize("mounts, match", [
    ([Mount("overlay", "overlay"), Mount("overlay", "overlay")], "one rootfs mount"),
    ([Mount("nfs", "server:/x")], "unsupported rootfs mount type"),
    ([Mount("overlay", "overlay", "", ("lowerdir=/nonexistent-kc",))], "mount overlay"),
])
def test_bad_mounts_are_rejected(tmp_path, mounts, match):
    with pytest.raises(Exception, match=match):
        rootfs.mount_rootfs(mounts, tmp_path / "rootfs")
    assert not rootfs.is_mountpoint(tmp_path / "rootfs")


def test_share_rejects_bad_ids(tmp_path):
    share = rootfs.Virtio9pShare(tmp_path)
    with pytest.raises(InvalidArgument):
        share.share_rootfs("../etc", tmp_path)
