"""libc mount(2)/umount2(2) wrappers and a mountinfo check, for the host shim and the guest agent.

Failures raise :class:`common.errors.ResourceError` naming the mount. Option strings follow
fstab (``ro,nosuid,nodev,size=64m``): :func:`parse_options` splits them into MS_* flags and the
filesystem's data string.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable

from common.errors import InvalidArgument, ResourceError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNC = 0x10
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 0x2

#: fstab option → MS_* flag (``rw`` and ``defaults`` add nothing). ``bind``/``rbind`` are not
#: here on purpose: a bind is a different mount(2) call, chosen by the caller.
FLAG_OPTIONS = {"ro": MS_RDONLY, "rdonly": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV,
                "noexec": MS_NOEXEC, "sync": MS_SYNC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "rw": 0, "defaults": 0}
MAX_OPTION = 256

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def parse_options(options: Iterable[str]) -> tuple[int, str]:
    """fstab-style options → (MS_* flags, data string). An entry may itself hold several
    comma-separated options (kata sends 9p's as one "trans=virtio,version=9p2000.L")."""
    flags = 0
    data = []
    for opt in (o for entry in options for o in entry.split(",")):
        if not opt or "\x00" in opt or len(opt) > MAX_OPTION:
            raise InvalidArgument(f"invalid mount option {opt[:64]!r}")
        if opt in FLAG_OPTIONS:
            flags |= FLAG_OPTIONS[opt]
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str | os.PathLike[str], fstype: str = "", flags: int = 0,
          data: str = "") -> None:
    """mount(2); ``fstype`` "" for binds and remounts."""
    rc = _libc.mount(source.encode(), os.fsencode(target), fstype.encode() if fstype else None,
                     flags, data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise ResourceError(f"mount {fstype or 'bind'} {source} on {os.fsdecode(target)}: {os.strerror(err)}")


def bind(source: str, target: str | os.PathLike[str], *, readonly: bool = False,
         recursive: bool = True, extra_flags: int = MS_NOSUID | MS_NODEV) -> None:
    """Bind ``source`` on ``target``, then remount the bind with ``extra_flags`` (default
    nosuid,nodev) and read-only when asked: the kernel ignores those flags on the first bind
    call, so a bind is only as restricted as its remount."""
    mount(source, target, "", MS_BIND | (MS_REC if recursive else 0))
    restrict = extra_flags | (MS_RDONLY if readonly else 0)
    if restrict:
        try:
            mount("", target, "", MS_BIND | MS_REMOUNT | restrict)
        except ResourceError:
            umount(target)
            raise


def umount(target: str | os.PathLike[str]) -> bool:
    """Lazily unmount ``target``; False when nothing was mounted there."""
    rc = _libc.umount2(os.fsencode(target), MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise ResourceError(f"umount {os.fsdecode(target)}: {os.strerror(err)}")
    return True


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field) >= i + 4 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo(pid: str = "self") -> list[dict[str, str]]:
    """Entries of /proc/<pid>/mountinfo: mount_point, root, fstype, source, options (per-mount
    options such as ``ro,nosuid``) and super_options."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) < 6 or len(b) < 3:
                continue
            out.append({"root": _unescape(a[3]), "mount_point": _unescape(a[4]), "options": a[5],
                        "fstype": b[0], "source": _unescape(b[1]), "super_options": b[2]})
    return out


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    p = os.path.realpath(path)
    return any(m["mount_point"] == p for m in mountinfo())


def unmount_all(path: str | os.PathLike[str]) -> None:
    """Unmount everything mounted at ``path`` (stacked mounts included)."""
    while is_mountpoint(path):
        umount(path)


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found = [m["mount_point"] for m in mountinfo()
             if m["mount_point"] == base or m["mount_point"].startswith(base.rstrip("/") + "/")]
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_tree(path: str | os.PathLike[str]) -> None:
    """Unmount every mount at or below ``path`` (deepest first)."""
    for mp in mounts_under(path):
        while umount(mp):
            pass


__all__ = ["MS_BIND", "MS_NODEV", "MS_NOSUID", "MS_RDONLY", "MS_REC", "MS_REMOUNT", "bind",
           "is_mountpoint", "mount", "mountinfo", "mounts_under", "parse_options", "umount",
           "unmount_all", "unmount_tree"]
