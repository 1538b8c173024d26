"""The layer-image cache with real mkfs.erofs (tiny trees): build once, reuse, size bound, LRU
eviction that never removes an image a VM holds; scratch disks and host-wide claims."""
import os
import shutil
import subprocess
import time

import pytest

from common.errors import FailedPrecondition
from shim.resources.blockdev import claims, scratch
from shim.resources.blockdev.cache import LayerCache

needs_erofs = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")


def _layer(root, name, size):
    d = root / name
    d.mkdir()
    (d / "blob").write_bytes(os.urandom(size))
    os.mknod(d / "whiteout", 0o600 | 0o020000, os.makedev(0, 0))  # an overlay whiteout survives
    return d


@needs_erofs
def test_build_once_then_hit(tmp_path):
    cache = LayerCache(tmp_path / "cache", 64 << 20)
    layer = _layer(tmp_path, "l1", 100_000)
    first = cache.acquire(str(layer))
    second = cache.acquire(str(layer))
    assert not first.hit and second.hit and first.path == second.path
    assert first.size > 100_000 and second.build_seconds == first.build_seconds
    if "erofs" in open("/proc/filesystems").read() and os.geteuid() == 0:  # the image reads back
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", first.path, str(mnt)], check=True)
        try:
            st = os.lstat(mnt / "whiteout")
            assert (mnt / "blob").read_bytes() == (layer / "blob").read_bytes()
            assert st.st_mode & 0o170000 == 0o020000 and st.st_rdev == os.makedev(0, 0)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    first.release()
    second.release()
    meta = cache._read_meta(first.key)
    assert meta["hits"] == 1 and meta["source"] == str(layer)


@needs_erofs
def test_size_bound_evicts_lru_but_never_a_leased_image(tmp_path):
    bound = 600_000
    cache = LayerCache(tmp_path / "cache", bound)
    a, b, c = (_layer(tmp_path, n, 250_000) for n in "abc")
    la = cache.acquire(str(a))  # held: a VM reads it
    lb = cache.acquire(str(b))
    lb.release()
    time.sleep(0.01)
    lc = cache.acquire(str(c))  # needs room: b (unused, oldest unleased) goes, a stays
    keys = {k for _, k, _ in cache.entries()}
    assert la.key in keys and lc.key in keys and lb.key not in keys
    assert cache.total_bytes() <= bound
    la.release()
    lc.release()
    assert cache.evict(room_for=bound) and cache.total_bytes() == 0


@needs_erofs
def test_changed_layer_dir_is_a_new_key(tmp_path):
    cache = LayerCache(tmp_path / "cache", 64 << 20)
    layer = _layer(tmp_path, "l", 1000)
    k1 = cache.acquire(str(layer))
    k1.release()
    shutil.rmtree(layer)
    layer = _layer(tmp_path, "l", 1000)  # containerd removed and recreated the snapshot
    k2 = cache.acquire(str(layer))
    k2.release()
    assert k1.key != k2.key and not k2.hit


def test_scratch_disk_is_sparse_ext4_and_removed(tmp_path):
    if shutil.which("mke2fs") is None:
        pytest.skip("e2fsprogs missing")
    path = scratch.scratch_path(str(tmp_path), "sb1", "c1")
    scratch.create(path, 256 << 20)
    st = os.stat(path)
    assert st.st_size == 256 << 20 and st.st_blocks * 512 < 32 << 20  # sparse
    out = subprocess.run(["dumpe2fs", "-h", path], capture_output=True, text=True).stdout
    assert "Filesystem magic number:  0xEF53" in out
    scratch.remove(path)
    assert not os.path.exists(path) and not (tmp_path / "sb1").exists()


def test_claims_one_sandbox_per_device(tmp_path):
    claims.take(tmp_path, "pci-0000:3b:00.0", "sb-a", "PCI device 0000:3b:00.0")
    claims.take(tmp_path, "pci-0000:3b:00.0", "sb-a", "again")  # idempotent for the owner
    with pytest.raises(FailedPrecondition, match="already given to sandbox sb-a"):
        claims.take(tmp_path, "pci-0000:3b:00.0", "sb-b", "PCI device 0000:3b:00.0")
    claims.release(tmp_path, "pci-0000:3b:00.0", "sb-b")  # not the owner: stays
    assert claims.owner(tmp_path, "pci-0000:3b:00.0") == "sb-a"
    claims.release(tmp_path, "pci-0000:3b:00.0", "sb-a")
    assert claims.owner(tmp_path, "pci-0000:3b:00.0") == ""
