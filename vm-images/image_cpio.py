"""Deterministic cpio (newc) writer for the initramfs layers."""
from __future__ import annotations

import os
import stat
from pathlib import Path


class Cpio:
    """Deterministic newc writer: uid/gid 0, fixed mtime, sorted paths."""

    def __init__(self, f):
        self.f = f
        self.ino = 1000
        self.size = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink=1) -> None:
        self.ino += 1
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{x:08X}" for x in (
            self.ino, mode, 0, 0, nlink, 1, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        buf = hdr.encode() + nb
        buf += b"\0" * (-len(buf) % 4)
        buf += data + b"\0" * (-len(data) % 4)
        self.f.write(buf)
        self.size += len(buf)

    def add_tree(self, root: Path, prefix: str = "") -> int:
        n = 0
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                paths.append(os.path.normpath(os.path.join(rel, name)))
        for rel in paths:
            p = root / rel
            st = os.lstat(p)
            name = (prefix + rel) if prefix else rel
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                self._entry(name, stat.S_IFLNK | 0o777, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                self._entry(name, stat.S_IFDIR | perm, nlink=2)
            elif stat.S_ISREG(st.st_mode):
                self._entry(name, stat.S_IFREG | perm, p.read_bytes())
            else:
                continue
            n += 1
        return n

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)
        pad = -self.size % 512
        self.f.write(b"\0" * pad)
        self.size += pad
