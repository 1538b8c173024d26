"""Host-wide claims: one device (a VFIO PCI function, a block device, a disk image file) is given
to at most one sandbox at a time.

A claim is a file ``<dir>/<name>`` created with ``O_EXCL`` holding the owner's sandbox id; the
directory lives on /run (tmpfs: a reboot frees every claim, as it frees every VM). The owner
journals the claim names before taking them; :func:`release` removes a claim only when it still
names that owner (so recovering one sandbox never frees another's device).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from common.errors import FailedPrecondition, InvalidArgument

DEFAULT_DIR = "/run/kata-colo/claims"
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def claim_name_for_path(path: str) -> str:
    """The claim of a block device (by device number) or an image file (by device + inode)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return f"blk-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"file-{st.st_dev}:{st.st_ino}"


def claim_name_for_pci(bdf: str) -> str:
    return f"pci-{bdf.lower()}"


def _path(directory: str | Path, name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"bad claim name {name!r}")
    return Path(directory) / name


def owner(directory: str | Path, name: str) -> str:
    try:
        return _path(directory, name).read_text()[:256].strip()
    except FileNotFoundError:
        return ""


def take(directory: str | Path, name: str, sandbox_id: str, what: str) -> None:
    """Claim ``name`` for ``sandbox_id`` (idempotent for the same owner); FailedPrecondition
    naming the other sandbox when it is taken."""
    p = _path(directory, name)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        other = owner(directory, name)
        if other == sandbox_id:
            return
        raise FailedPrecondition(f"{what} is already given to sandbox {other or '?'}") from None
    with os.fdopen(fd, "w") as f:
        f.write(sandbox_id + "\n")


def release(directory: str | Path, name: str, sandbox_id: str) -> None:
    if owner(directory, name) == sandbox_id:
        _path(directory, name).unlink(missing_ok=True)
