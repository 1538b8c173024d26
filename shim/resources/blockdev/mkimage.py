"""Build a read-only filesystem image of one directory tree (an image layer).

``erofs`` (Debian ``erofs-utils``: ``mkfs.erofs``) is the default: compact, read-only by design,
built in one pass; ``ext4`` (``mke2fs -d``, e2fsprogs) is the fallback where the guest kernel
lacks erofs. Both keep owners, modes, device nodes (overlay whiteouts are 0/0 character devices)
and xattrs (``trusted.overlay.opaque``), which the guest overlay needs to read the layer as
containerd wrote it. Blocking (subprocess): call through ``asyncio.to_thread``.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from common.errors import FailedPrecondition, ResourceError

FORMATS = ("erofs", "ext4")
TOOLS = {"erofs": "mkfs.erofs", "ext4": "mke2fs"}
BUILD_TIMEOUT = 600.0
_EXT4_SLACK = 1.25
_EXT4_MIN_BYTES = 16 << 20


def tool_for(fmt: str) -> str | None:
    """The builder's path, or None when it is not installed."""
    if fmt not in FORMATS:
        raise FailedPrecondition(f"layer image format must be one of {FORMATS}, not {fmt!r}")
    return shutil.which(TOOLS[fmt], path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def tree_bytes(root: str) -> tuple[int, int]:
    """(bytes of file data, number of entries) below ``root`` (symlinks not followed)."""
    size, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            size += st.st_blocks * 512 if st.st_blocks else st.st_size
    return size, count


def build(fmt: str, source: str, out: str) -> int:
    """Write the image of ``source`` to ``out`` (created or replaced); returns its size."""
    tool = tool_for(fmt)
    if tool is None:
        raise FailedPrecondition(f"{TOOLS[fmt]} is not installed (apt install "
                                 f"{'erofs-utils' if fmt == 'erofs' else 'e2fsprogs'})")
    if fmt == "erofs":
        argv = [tool, "--quiet", "-x2", out, source]
    else:
        data, entries = tree_bytes(source)
        size = max(_EXT4_MIN_BYTES, int((data + entries * 4096) * _EXT4_SLACK))
        size = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
        with open(out, "wb") as f:
            f.truncate(size)
        argv = [tool, "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal",
                "-E", "lazy_itable_init=1,nodiscard", "-m", "0", "-d", source, out]
    try:
        res = subprocess.run(argv, capture_output=True, timeout=BUILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ResourceError(f"{os.path.basename(tool)} of {source} took longer than "
                            f"{BUILD_TIMEOUT:.0f}s") from None
    if res.returncode != 0:
        raise ResourceError(f"{os.path.basename(tool)} {source}: exit {res.returncode}: "
                            f"{res.stderr.decode(errors='replace').strip()[-500:]}")
    return os.path.getsize(out)


def make_ext4(path: str, size_bytes: int) -> None:
    """A sparse, empty ext4 filesystem of ``size_bytes`` at ``path`` (a scratch disk)."""
    tool = tool_for("ext4")
    if tool is None:
        raise FailedPrecondition("mke2fs is not installed (apt install e2fsprogs)")
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    res = subprocess.run([tool, "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0",
                          "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path],
                         capture_output=True, timeout=BUILD_TIMEOUT, check=False)
    if res.returncode != 0:
        raise ResourceError(f"mke2fs {path}: exit {res.returncode}: "
                            f"{res.stderr.decode(errors='replace').strip()[-500:]}")
