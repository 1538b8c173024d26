"""Mounting and unmounting inside a directory the guest can write (the sandbox share).

The guest is untrusted and sees the share read-write: it can create, rename or replace any entry
there, symlinks included, at any time. A plain ``mount(src, share/name)`` would follow a symlink
the guest planted at ``name`` and bind over a host path of its choosing; ``umount(share/a/b)``
would follow one planted at ``a``. So every path below the share is opened with ``openat2``
(``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``) relative to an fd of the
share, and mount(2)/umount2(2) act on that fd through ``/proc/self/fd/N`` — the exact inode
we opened, wherever the guest moves names around.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from pathlib import Path

from common.errors import InvalidArgument, ResourceError
from common.mount import MNT_DETACH, MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT, mount

_SYS_OPENAT2 = 437  # x86_64 and aarch64
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def openat2(dir_fd: int, path: str, flags: int, resolve: int = _RESOLVE, mode: int = 0) -> int:
    """openat2(2): ``path`` resolved below ``dir_fd`` without following any symlink."""
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), buf, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2 {path}: {os.strerror(err)}")
    return int(fd)


def _check_rel(rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
        raise InvalidArgument(f"bad share path {rel!r}")
    return rel


class Beneath:
    """Operations below one trusted base directory (held open as an fd)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, rel: str, flags: int = os.O_PATH) -> int:
        try:
            return openat2(self._fd, _check_rel(rel), flags | os.O_NOFOLLOW)
        except OSError as exc:
            raise ResourceError(f"{self.base}/{rel}: {exc.strerror}") from None

    def makedirs(self, rel: str, mode: int = 0o700) -> None:
        """mkdir -p below the base; every component must be a real directory (not a symlink)."""
        done = []
        for part in _check_rel(rel).split("/"):
            done.append(part)
            parent = "/".join(done[:-1])
            pfd = self.open(parent, os.O_PATH | os.O_DIRECTORY) if parent else os.dup(self._fd)
            try:
                try:
                    os.mkdir(part, mode, dir_fd=pfd)
                except FileExistsError:
                    st = os.stat(part, dir_fd=pfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        raise ResourceError(f"{self.base}/{'/'.join(done)} exists and is not a directory") from None
            finally:
                os.close(pfd)

    def create_file(self, rel: str) -> None:
        """An empty regular file at ``rel`` (an existing regular file is kept; anything else fails)."""
        parent, _, name = _check_rel(rel).rpartition("/")
        if parent:
            self.makedirs(parent)
        pfd = self.open(parent, os.O_PATH | os.O_DIRECTORY) if parent else os.dup(self._fd)
        try:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=pfd)
                os.close(fd)
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise ResourceError(f"{self.base}/{rel} exists and is not a regular file") from None
        finally:
            os.close(pfd)

    def bind(self, source: str, rel: str, *, readonly: bool, recursive: bool = True) -> None:
        """Bind ``source`` (a trusted host path) on ``rel`` below the base, ``nosuid,nodev`` and
        read-only when asked (the remount makes those flags real; the first bind ignores them)."""
        fd = self.open(rel)
        try:
            target = f"/proc/self/fd/{fd}"
            mount(source, target, "", MS_BIND | (MS_REC if recursive else 0))
            flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
            try:
                # the fd still names the directory under the new mount: reopen to reach its root
                fd2 = self.open(rel)
                try:
                    mount("", f"/proc/self/fd/{fd2}", "", flags)
                finally:
                    os.close(fd2)
            except BaseException:
                self.umount(rel)
                raise
        finally:
            os.close(fd)

    def umount(self, rel: str) -> bool:
        """Lazily unmount the mount at ``rel`` below the base; False when none is there."""
        parent = _check_rel(rel).rpartition("/")[0]
        try:
            fd = self.open(rel)
        except ResourceError:
            return False
        try:
            pfd = self.open(parent, os.O_PATH | os.O_DIRECTORY) if parent else os.dup(self._fd)
            try:
                if _mnt_id(fd) == _mnt_id(pfd):
                    return False  # not a mount point
            finally:
                os.close(pfd)
            rc = _libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH)
            if rc != 0:
                err = ctypes.get_errno()
                if err in (errno.EINVAL, errno.ENOENT):
                    return False
                raise ResourceError(f"umount {self.base}/{rel}: {os.strerror(err)}")
            return True
        finally:
            os.close(fd)

    def umount_all(self, rel: str) -> None:
        while self.umount(rel):
            pass


def _mnt_id(fd: int) -> str:
    """The mount id of the mount ``fd`` lives on (from /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next((line.split()[1] for line in f if line.startswith("mnt_id:")), "")
