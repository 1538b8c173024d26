"""The bundle rootfs (containerd's Mounts on <bundle>/rootfs): mounted nosuid,nodev on the host,
bad mounts rejected with nothing left mounted."""
import pytest

from common.errors import InvalidArgument
from common.mount import is_mountpoint, mountinfo
from shim import rootfs
from shim.backend import Mount

pytestmark = pytest.mark.root


def _overlay(tmp_path):
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "hello").write_text("from lower\n")
    return Mount("overlay", "overlay", "", (f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"))


def _options(path) -> set[str]:
    return set(next(m["options"] for m in reversed(mountinfo()) if m["mount_point"] == str(path)).split(","))


def test_overlay_mounted_nosuid_nodev_and_released(tmp_path):
    bundle_rootfs = tmp_path / "bundle" / "rootfs"
    assert rootfs.mount_rootfs([_overlay(tmp_path)], bundle_rootfs)
    try:
        assert (bundle_rootfs / "hello").read_text() == "from lower\n"
        assert {"nosuid", "nodev"} <= _options(bundle_rootfs)
        (bundle_rootfs / "new").write_text("x")
    finally:
        rootfs.unmount_all(bundle_rootfs)
    assert not is_mountpoint(bundle_rootfs)
    assert (tmp_path / "upper" / "new").exists()


def test_bind_rootfs_is_restricted_by_a_remount(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    target = tmp_path / "rootfs"
    assert rootfs.mount_rootfs([Mount("bind", str(src), "", ("rbind", "ro"))], target)
    try:
        assert {"ro", "nosuid", "nodev"} <= _options(target)
    finally:
        rootfs.unmount_all(target)


def test_no_mounts_means_prepopulated_rootfs(tmp_path):
    assert rootfs.mount_rootfs([], tmp_path / "rootfs") is False


@pytest.mark.parametrize("mounts, match", [
    ([Mount("overlay", "overlay"), Mount("overlay", "overlay")], "one rootfs mount"),
    ([Mount("nfs", "server:/x")], "unsupported rootfs mount type"),
    ([Mount("overlay", "overlay", "", ("lowerdir=/nonexistent-kc",))], "mount overlay"),
    ([Mount("overlay", "overlay", "", ("lowerdir=/x\x00",))], "NUL"),
])
def test_bad_mounts_are_rejected(tmp_path, mounts, match):
    with pytest.raises((InvalidArgument, Exception), match=match):
        rootfs.mount_rootfs(mounts, tmp_path / "rootfs")
    assert not is_mountpoint(tmp_path / "rootfs")
