"""The host-wide cache of read-only layer images, bounded in size, shared by every shim.

An image layer (a committed snapshot directory of containerd's overlayfs snapshotter) is built
into a block image once (:mod:`~shim.resources.blockdev.mkimage`) and reused by every container
of every sandbox that has the same layer. The snapshotter does not tell a shim the layer's
digest, so the cache key is the layer directory's identity: its real path, device, inode and
ctime (a committed snapshot never changes; a snapshot containerd removed and recreated gets a
new inode and ctime). Files in ``root``::

    <key>.<fmt>    the image          <key>.json   source, size, build time, hits (last use = mtime)
    <key>.build    per-key build lock .lock        the cache lock (lookups, leases, eviction)

**Leases**: a user holds ``flock(LOCK_SH)`` on the image for as long as a VM may read it
(:class:`LayerLease`); the lock dies with the shim, so a crash never pins an image. **Eviction**
(before each new image is published): least recently used first, only images nobody holds
(``LOCK_EX|LOCK_NB`` succeeds), until the total fits ``max_bytes``. An image larger than the
whole bound is still served, and is the first to go once unused.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ResourceError
from shim.resources.blockdev import mkimage

log = logging.getLogger(__name__)

LOCK = ".lock"
META_MAX = 64 << 10


@dataclass
class LayerLease:
    """One user's hold on a cached image. ``hit`` = no build was needed; ``seconds`` = the time
    this acquire took; ``build_seconds`` = what building it cost (once)."""

    key: str
    path: str
    size: int
    hit: bool
    seconds: float
    build_seconds: float
    fd: int = -1

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the shared lock
            self.fd = -1


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def layer_key(layer_dir: str, fmt: str) -> str:
    """The cache key of a layer directory (see the module docstring)."""
    real = os.path.realpath(layer_dir)
    st = os.stat(real)
    ident = f"{fmt}\0{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_ctime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


class LayerCache:
    def __init__(self, root: str | Path, max_bytes: int, fmt: str = "erofs") -> None:
        if fmt not in mkimage.FORMATS:
            raise ResourceError(f"layer image format must be one of {mkimage.FORMATS}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fmt = fmt

    def _image(self, key: str) -> Path:
        return self.root / f"{key}.{self.fmt}"

    def _meta(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- acquire ------------------------------------------------------------------------------

    def acquire(self, layer_dir: str) -> LayerLease:
        """A lease on the image of ``layer_dir``, built when the cache does not have it."""
        t0 = time.monotonic()
        self._prepare()
        key = layer_key(layer_dir, self.fmt)
        with _flock(self.root / LOCK):
            lease = self._lease(key, t0)
        if lease is not None:
            return lease
        with _flock(self.root / f"{key}.build"):  # one builder per layer; others wait for it
            with _flock(self.root / LOCK):
                lease = self._lease(key, t0)
            if lease is not None:
                return lease
            tmp = self.root / f".{key}.tmp-{os.getpid()}"
            b0 = time.monotonic()
            try:
                size = mkimage.build(self.fmt, layer_dir, str(tmp))
                build_seconds = time.monotonic() - b0
                with _flock(self.root / LOCK):
                    self._evict_locked(room_for=size)
                    os.replace(tmp, self._image(key))
                    self._write_meta(key, {"source": os.path.realpath(layer_dir), "size": size,
                                           "format": self.fmt, "build_seconds": round(build_seconds, 3),
                                           "built_at": time.time(), "hits": 0})
                    lease = self._lease(key, t0, hit=False)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                with contextlib.suppress(FileNotFoundError):
                    (self.root / f"{key}.build").unlink()
        if lease is None:
            raise ResourceError(f"layer image {key} vanished right after it was built")
        log.info("layer %s: built %s image %s (%d KiB) in %.2fs", layer_dir, self.fmt, key,
                 lease.size >> 10, lease.build_seconds)
        return lease

    def _lease(self, key: str, t0: float, hit: bool = True) -> LayerLease | None:
        """With the cache lock held: open + share-lock the image, count the hit."""
        try:
            fd = os.open(self._image(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        meta = self._read_meta(key)
        if hit:
            meta["hits"] = int(meta.get("hits", 0)) + 1
            self._write_meta(key, meta)
        else:
            os.utime(self._meta(key))
        return LayerLease(key, str(self._image(key)), os.fstat(fd).st_size, hit,
                          time.monotonic() - t0, float(meta.get("build_seconds", 0.0)), fd)

    def _read_meta(self, key: str) -> dict[str, Any]:
        try:
            with open(self._meta(key), "rb") as f:
                data = json.loads(f.read(META_MAX))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_meta(self, key: str, meta: dict[str, Any]) -> None:
        tmp = self.root / f".{key}.json-{os.getpid()}"
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, self._meta(key))

    # -- eviction -----------------------------------------------------------------------------

    def entries(self) -> list[tuple[float, str, int]]:
        """(last use, key, size) of every cached image, least recently used first."""
        out = []
        for p in self.root.glob(f"*.{self.fmt}"):
            key = p.name[: -len(self.fmt) - 1]
            try:
                size = p.stat().st_size
                used = self._meta(key).stat().st_mtime
            except FileNotFoundError:
                used = 0.0
                size = p.stat().st_size if p.exists() else 0
            out.append((used, key, size))
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _, _, size in self.entries())

    def evict(self, room_for: int = 0) -> list[str]:
        """Evict unused images (LRU) until ``room_for`` more bytes fit; the keys removed."""
        self._prepare()
        with _flock(self.root / LOCK):
            return self._evict_locked(room_for)

    def _evict_locked(self, room_for: int) -> list[str]:
        self._remove_stale_tmp()
        entries = self.entries()
        total = sum(size for _, _, size in entries)
        removed: list[str] = []
        for _, key, size in entries:
            if total + room_for <= self.max_bytes:
                break
            if self._remove_if_unused(key):
                removed.append(key)
                total -= size
                log.info("layer cache: evicted %s (%d KiB)", key, size >> 10)
        return removed

    def _remove_if_unused(self, key: str) -> bool:
        try:
            fd = os.open(self._image(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a VM reads it
            self._image(key).unlink()
            with contextlib.suppress(FileNotFoundError):
                self._meta(key).unlink()
            return True
        finally:
            os.close(fd)

    def _remove_stale_tmp(self) -> None:
        """Half-written images of builders that died (their pid is gone)."""
        for p in self.root.glob(".*.tmp-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
