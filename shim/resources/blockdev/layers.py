"""containerd's rootfs Mounts → what a block rootfs is made of (pure: no I/O but ``stat``).

The overlayfs snapshotter hands the Task service one Mount per container:

* ``overlay`` with ``lowerdir=top:...:bottom`` (committed image layers, read-only) and, for a
  writable container, ``upperdir=`` + ``workdir=`` (the container's own, usually empty) — the
  layers become cached read-only block images, the upper dir's content (if any) one more
  uncached layer on top;
* ``bind`` (``rbind``) of a single snapshot directory: an image with one layer viewed read-only
  (``ro``), or an active snapshot without parents (its own upper, read-write);
* a block-device mount from the devmapper snapshotter (``type`` a filesystem such as ``ext4``
  or ``xfs``, ``source`` a ``/dev/...`` block device): passed to the VM as is.

Anything else (``native`` snapshotter trees full of hard links are still ``bind``; a mount list
of more than one entry; ``tmpfs``; FUSE) is :class:`Unsupported` with the reason, and the caller
falls back to the 9p share.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from shim.backend import Mount

#: Filesystems a devmapper snapshot may carry (containerd's ``fs_type``: ext4 or xfs).
BLOCK_FSTYPES = ("ext4", "xfs")
MAX_LAYERS = 64


@dataclass(frozen=True)
class Layered:
    """An overlay of read-only layer directories (``lowers``, top first) and the container's
    writable ``upper`` dir ("" = read-only view). ``upper_has_content`` tells whether the upper
    already holds files (a restarted or committed container), which then become one more layer."""

    lowers: tuple[str, ...]
    upper: str = ""
    upper_has_content: bool = False
    readonly: bool = False


@dataclass(frozen=True)
class BlockSnapshot:
    """A devmapper snapshot: ``device`` (a block device node) holding ``fstype``."""

    device: str
    fstype: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unsupported:
    reason: str


RootfsSource = Layered | BlockSnapshot | Unsupported


def _options(opts: Sequence[str]) -> tuple[dict[str, str], set[str]]:
    kv: dict[str, str] = {}
    flags: set[str] = set()
    for entry in opts:
        for opt in entry.split(","):
            key, sep, value = opt.partition("=")
            if sep:
                kv[key] = value
            elif opt:
                flags.add(opt)
    return kv, flags


def _dir_has_content(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def classify(mounts: Sequence[Mount]) -> RootfsSource:
    """What ``mounts`` (CreateTaskRequest.rootfs) are, for the block rootfs."""
    if not mounts:
        return Unsupported("no rootfs mounts (a prepared bundle rootfs)")
    if len(mounts) != 1:
        return Unsupported(f"{len(mounts)} rootfs mounts")
    m = mounts[0]
    kv, flags = _options(m.options)
    if m.type == "overlay":
        lowers = tuple(p for p in kv.get("lowerdir", "").split(":") if p)
        if not lowers:
            return Unsupported("overlay mount without lowerdir")
        if len(lowers) > MAX_LAYERS:
            return Unsupported(f"{len(lowers)} layers (more than {MAX_LAYERS})")
        for p in lowers:
            if not os.path.isabs(p) or not os.path.isdir(p):
                return Unsupported(f"overlay lower {p!r} is not a directory")
        upper = kv.get("upperdir", "")
        if upper and (not os.path.isabs(upper) or not os.path.isdir(upper)):
            return Unsupported(f"overlay upperdir {upper!r} is not a directory")
        return Layered(lowers, upper, bool(upper) and _dir_has_content(upper),
                       readonly=not upper or "ro" in flags)
    if m.type in ("bind", "rbind") or (m.type in ("", "none") and ({"bind", "rbind"} & flags)):
        if not os.path.isabs(m.source) or not os.path.isdir(m.source):
            return Unsupported(f"bind rootfs source {m.source!r} is not a directory")
        if "ro" in flags:  # a read-only view of one committed layer
            return Layered((m.source,), readonly=True)
        # an active snapshot without parents: all of the image is its own (upper) content
        return Layered((), m.source, _dir_has_content(m.source))
    if m.type in BLOCK_FSTYPES:
        if not _is_block_device(m.source):
            return Unsupported(f"{m.type} rootfs source {m.source!r} is not a block device")
        return BlockSnapshot(m.source, m.type, tuple(o for o in m.options if o))
    return Unsupported(f"rootfs mount type {m.type!r}")
