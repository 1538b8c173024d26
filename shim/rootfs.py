"""Container root filesystems: containerd's Mounts on the bundle, shared into the guest.

containerd hands Create a list of Mounts (overlay lowerdir/upperdir/workdir with the overlayfs
snapshotter, a bind mount with native) to be mounted on ``<bundle>/rootfs``. The rootfs is then
bind-mounted into the sandbox's shared directory, which the hypervisor exports to the guest
(virtio-9p now; :class:`SharedFs` is the seam for virtio-fs later). Every mount made here is
undone by :func:`unmount_all` / :meth:`SharedFs.unshare`, also from ``delete`` after a crash.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Protocol, Sequence

from common.errors import InvalidArgument
from common.guest_paths import GUEST_SHARED_DIR, SHARE_TAG
from common.ids import ID_RE, check_id
from common.mount import MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT, is_mountpoint, umount, unmount_all
from common.mount import mount as _mount
from shim.backend import Mount

_FLAG_OPTS = {"ro": MS_RDONLY, "rbind": MS_BIND | MS_REC, "bind": MS_BIND}
_IGNORED_OPTS = {"rw", "defaults"}


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
    flags = 0
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
    fstype = "" if flags & MS_BIND else m.type
    _mount(m.source, str(rootfs), fstype, flags & ~MS_RDONLY, ",".join(data))
    if flags & MS_BIND and flags & MS_RDONLY:
        _mount("", str(rootfs), "", MS_BIND | MS_RDONLY | MS_REMOUNT, "")
    return True


class SharedFs(Protocol):
    host_dir: Path
    tag: str

    def share_rootfs(self, container_id: str, host_rootfs: Path) -> str: ...
    def share_path(self, source: str, name: str) -> str: ...
    def unshare_path(self, name: str) -> None: ...
    def unshare(self, container_id: str) -> None: ...
    def cleanup(self) -> None: ...


class Virtio9pShare:
    """The sandbox's shared directory exported over virtio-9p with mount tag ``kataShared``;
    the guest agent mounts it at /run/kata-containers/shared/containers."""

    def __init__(self, host_dir: Path, tag: str = SHARE_TAG) -> None:
        self.host_dir = host_dir
        self.tag = tag

    def prepare(self) -> None:
        self.host_dir.mkdir(parents=True, exist_ok=True)

    def share_rootfs(self, container_id: str, host_rootfs: Path) -> str:
        check_id(container_id, "container id")
        target = self.host_dir / container_id / "rootfs"
        target.mkdir(parents=True, exist_ok=True)
        if not is_mountpoint(target):
            _mount(str(host_rootfs), str(target), "", MS_BIND | MS_REC, "")
        return f"{GUEST_SHARED_DIR}/{container_id}/rootfs"

    def share_path(self, source: str, name: str) -> str:
        """Bind a host file or directory (CRI's /etc/hosts, volumes) into the share as ``name``."""
        if not ID_RE.match(name):
            raise InvalidArgument(f"invalid share name {name!r}")
        target = self.host_dir / name
        if os.path.isdir(source):
            target.mkdir(exist_ok=True)
        elif not target.exists():
            target.touch()
        if not is_mountpoint(target):
            _mount(source, str(target), "", MS_BIND | MS_REC, "")
        return f"{GUEST_SHARED_DIR}/{name}"

    def unshare_path(self, name: str) -> None:
        target = self.host_dir / name
        while is_mountpoint(target):
            umount(target)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    def unshare(self, container_id: str) -> None:
        check_id(container_id, "container id")
        base = self.host_dir / container_id
        target = base / "rootfs"
        while is_mountpoint(target):
            umount(target)
        shutil.rmtree(base, ignore_errors=True)

    def cleanup(self) -> None:
        if not self.host_dir.exists():
            return
        for child in self.host_dir.iterdir():
            if child.is_dir() and (child / "rootfs").exists():
                self.unshare(child.name)
            else:
                self.unshare_path(child.name)
        shutil.rmtree(self.host_dir, ignore_errors=True)


__all__ = ["GUEST_SHARED_DIR", "SHARE_TAG", "SharedFs", "Virtio9pShare", "mount_rootfs", "unmount_all"]
