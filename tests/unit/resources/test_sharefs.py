"""The 9p share on the host: 0700, nosuid,nodev binds, read-only on the host side for read-only
mounts, and no symlink the (untrusted) guest plants in the share is ever followed."""
import os
import stat
from pathlib import Path

import pytest

from common.errors import InvalidArgument, ResourceError
from common.mount import mountinfo, mounts_under
from shim.resources.sharefs import Virtio9pShare

pytestmark = pytest.mark.root


def _options(path: Path) -> set[str]:
    return set(next(m["options"] for m in reversed(mountinfo()) if m["mount_point"] == str(path)).split(","))


@pytest.fixture
def share(tmp_path):
    s = Virtio9pShare(tmp_path / "sb" / "shared")
    s.prepare()
    yield s
    s.cleanup()
    assert not mounts_under(tmp_path)


def test_share_tree_is_private(share):
    for p in (share.host_dir, share.host_dir.parent):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700


def test_rootfs_and_volume_binds(share, tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "hello").write_text("hi")
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data").write_text("d")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    assert share.share_rootfs("c1", rootfs) == "/run/kata-containers/shared/containers/c1/rootfs"
    assert share.share_path(str(vol), "c1-aaaaaaaaaaaa-vol", readonly=True).endswith("/c1-aaaaaaaaaaaa-vol")
    share.share_path(str(hosts), "c1-bbbbbbbbbbbb-hosts")
    assert (share.host_dir / "c1" / "rootfs" / "hello").read_text() == "hi"
    assert {"nosuid", "nodev"} <= _options(share.host_dir / "c1" / "rootfs")
    assert {"ro", "nosuid", "nodev"} <= _options(share.host_dir / "c1-aaaaaaaaaaaa-vol")
    assert "rw" in _options(share.host_dir / "c1-bbbbbbbbbbbb-hosts")
    with pytest.raises(OSError):  # read-only on the host side, whatever the guest does
        (share.host_dir / "c1-aaaaaaaaaaaa-vol" / "new").write_text("x")
    assert (share.host_dir / "c1-aaaaaaaaaaaa-vol" / "data").read_text() == "d"
    share.unshare_container("c1", lambda name: name.startswith("c1-"))
    assert not mounts_under(share.host_dir) and os.listdir(share.host_dir) == []
    assert (vol / "data").read_text() == "d" and (rootfs / "hello").exists()  # sources untouched


def test_symlinks_planted_by_the_guest_are_not_followed(share, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("k")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(victim, share.host_dir / "c2")              # rootfs parent is a symlink
    os.symlink(victim / "keep", share.host_dir / "c2-cccccccccccc-f")  # a file share is a symlink
    with pytest.raises(ResourceError):
        share.share_rootfs("c2", src)
    with pytest.raises(ResourceError):
        share.share_path(str(src / "."), "c2-cccccccccccc-f")
    assert not mounts_under(victim) and not (victim / "rootfs").exists()
    share.unshare_container("c2", lambda name: name.startswith("c2-"))
    assert (victim / "keep").read_text() == "k"            # the symlinks went, their targets stayed


def test_bad_names_are_invalid(share, tmp_path):
    with pytest.raises(InvalidArgument):
        share.share_rootfs("../etc", tmp_path)
    with pytest.raises(InvalidArgument):
        share.share_path("/etc/hosts", "../x")
    with pytest.raises(InvalidArgument):
        share.share_path("relative", "ok-name")


def test_guest_moves_a_container_dir_and_plants_a_symlink_to_a_mounted_host_dir(share, tmp_path):
    """The guest renames ``c3`` (its rootfs bind inside) and puts ``c3 -> <host dir with a
    mount>`` in its place: unshare removes the symlink without following it (no error, the host
    mount untouched) and the share's cleanup still finds and unmounts the moved bind."""
    from common.mount import mount, umount

    victim = tmp_path / "victim"
    (victim / "m").mkdir(parents=True)
    mount("tmpfs", str(victim / "m"), "tmpfs")
    try:
        rootfs = tmp_path / "rootfs3"
        rootfs.mkdir()
        share.share_rootfs("c3", rootfs)
        os.rename(share.host_dir / "c3", share.host_dir / "c3-moved")
        os.symlink(victim, share.host_dir / "c3")
        share.unshare("c3")
        assert not os.path.lexists(share.host_dir / "c3")
        assert mounts_under(victim) == [str(victim / "m")]            # the host's mount is untouched
        assert mounts_under(share.host_dir) == [str(share.host_dir / "c3-moved" / "rootfs")]
        share.cleanup()
        assert not mounts_under(tmp_path / "sb") and mounts_under(victim) == [str(victim / "m")]
    finally:
        umount(str(victim / "m"))
