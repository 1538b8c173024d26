"""Unix socket helpers for ttrpc: peer credentials and binding a private listening socket."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct

from common import errors

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the peer of a connected AF_UNIX socket (SO_PEERCRED), else None."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _is_live(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch a live socket or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise errors.AlreadyExists(f"{path}: exists and is not a socket")
    if _is_live(path):
        raise errors.AlreadyExists(f"{path}: a server is already listening")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def bind_listening(path: str, backlog: int = 128) -> socket.socket:
    """A listening AF_UNIX socket at ``path`` with mode 0600 (stale socket files replaced)."""
    remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        os.chmod(path, 0o600)  # before listen(): nobody can connect in between
        sock.listen(backlog)
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return sock
