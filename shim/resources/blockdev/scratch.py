"""Per-container scratch disks: the writable layer (overlay upper + work) of a block rootfs.

A sparse file ``<dir>/<sandbox-id>/<container-id>.img`` formatted ext4 (nothing is allocated on
the host until the container writes). The path is journaled before the file is created (the
caller's resource record) and the file is deleted at teardown or recovery; the per-sandbox
directory goes with its last disk. The directory is on a disk (``/var/lib``), not /run: a
container's writes must not land in host RAM.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from common.errors import InvalidArgument
from common.ids import check_id
from shim.resources.blockdev import mkimage

DEFAULT_DIR = "/var/lib/kata-colo/scratch"
MIN_BYTES = 64 << 20


def scratch_path(root: str, sandbox_id: str, container_id: str, suffix: str = "img") -> str:
    check_id(sandbox_id, "sandbox id")
    check_id(container_id, "container id")
    if not os.path.isabs(root):
        raise InvalidArgument(f"scratch directory {root!r} is not absolute")
    return str(Path(root) / sandbox_id / f"{container_id}.{suffix}")


def create(path: str, size_bytes: int) -> None:
    """A fresh sparse ext4 scratch disk at ``path`` (a leftover of a crashed attempt is replaced)."""
    if size_bytes < MIN_BYTES:
        raise InvalidArgument(f"scratch disk must be at least {MIN_BYTES >> 20} MiB")
    parent = Path(path).parent
    parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    parent.mkdir(exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        mkimage.make_ext4(path, size_bytes)
    except BaseException:
        remove(path)
        raise


def remove(path: str) -> None:
    """Delete the disk (idempotent) and its sandbox directory once empty."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(Path(path).parent)
