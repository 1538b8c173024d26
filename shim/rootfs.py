"""Container root filesystems on the bundle: containerd's Mounts on ``<bundle>/rootfs``.

containerd hands Create a list of Mounts (overlay lowerdir/upperdir/workdir with the overlayfs
snapshotter, a bind mount with native) to be mounted on ``<bundle>/rootfs``, as runc's shim does.
The mount is ``nosuid,nodev`` on the host: the guest writes this tree (through the share), and
nothing it writes may become a setuid or device file that works on the host. The guest still
sees modes and device numbers as written (9p reports them; the guest kernel enforces them).
:func:`unmount_all` undoes it, also from ``delete`` after a crash. Sharing into the guest is
:mod:`shim.resources.sharefs`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.errors import InvalidArgument
from common.mount import MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT, mount, unmount_all
from shim.backend import Mount

_FLAG_OPTS = {"ro": MS_RDONLY, "rbind": MS_BIND | MS_REC, "bind": MS_BIND, "nosuid": MS_NOSUID,
              "nodev": MS_NODEV}
_IGNORED_OPTS = {"rw", "defaults", "suid", "dev"}


def mount_rootfs(mounts: Sequence[Mount], rootfs: Path) -> bool:
    """Mount containerd's rootfs Mounts on the bundle's rootfs dir. False when there were none
    (ctr --rootfs / a pre-populated bundle)."""
    if not mounts:
        return False
    if len(mounts) != 1:
        raise InvalidArgument(f"expected one rootfs mount, got {len(mounts)}")
    m = mounts[0]
    if m.type not in ("overlay", "bind", "rbind", "none", ""):
        raise InvalidArgument(f"unsupported rootfs mount type {m.type!r}")
    flags = MS_NOSUID | MS_NODEV
    data: list[str] = []
    for opt in m.options:
        if "\x00" in opt:
            raise InvalidArgument("NUL byte in mount option")
        if opt in _FLAG_OPTS:
            flags |= _FLAG_OPTS[opt]
        elif opt not in _IGNORED_OPTS:
            data.append(opt)
    if m.type in ("bind", "rbind"):
        flags |= MS_BIND | (MS_REC if m.type == "rbind" else 0)
    rootfs.mkdir(parents=True, exist_ok=True)
    if flags & MS_BIND:
        mount(m.source, rootfs, "", flags & (MS_BIND | MS_REC))
        try:  # a bind takes nosuid/nodev/ro only from a remount
            mount("", rootfs, "", MS_BIND | MS_REMOUNT | (flags & (MS_NOSUID | MS_NODEV | MS_RDONLY)))
        except BaseException:
            unmount_all(rootfs)
            raise
    else:
        mount(m.source, rootfs, m.type, flags & ~(MS_BIND | MS_REC), ",".join(data))
    return True


__all__ = ["mount_rootfs", "unmount_all"]
