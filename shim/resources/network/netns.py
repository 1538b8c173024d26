"""Run code inside a network namespace without forking.

``setns(CLONE_NEWNET)`` only switches the calling *thread*, so :func:`run_in_netns` starts a
short-lived thread, moves it into the target namespace, runs the callable there and returns its
result. Sockets and /dev/net/tun fds opened by the callable stay bound to that namespace after
the thread ends, so the caller can keep using them (netlink sockets, tap queue fds for QEMU,
AF_PACKET sockets in tests). The calling thread's namespace is never changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from common.errors import InvalidArgument, NotFound, ResourceError

CLONE_NEWNET = 0x40000000
NSFS_MAGIC = 0x6E736673

T = TypeVar("T")

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _setns(fd: int) -> None:
    if _get_libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def validate_netns_path(path: str) -> None:
    """Raise InvalidArgument/NotFound unless *path* names a network namespace file."""
    if not path or not os.path.isabs(path):
        raise InvalidArgument(f"netns path must be absolute, got {path!r}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"netns {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"netns {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"netns {path} is a directory, not a namespace file")


def open_netns(path: str) -> int:
    """Open *path* as a netns fd (O_RDONLY|O_CLOEXEC). Caller closes it."""
    validate_netns_path(path)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"netns {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot open netns {path}: {exc.strerror}") from None


def netns_exists(path: str) -> bool:
    try:
        validate_netns_path(path)
    except (NotFound, InvalidArgument):
        return False
    return True


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` on a fresh thread that has joined the network namespace at *path*.

    Raises NotFound if the namespace file is missing, InvalidArgument if it is not a network
    namespace; exceptions raised by *fn* propagate unchanged.
    """
    nsfd = open_netns(path)
    result: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            try:
                _setns(nsfd)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise InvalidArgument(f"{path} is not a network namespace") from None
                raise ResourceError(f"setns({path}): {exc.strerror}") from None
            result.append(fn())
        except BaseException as exc:  # re-raised on the calling thread
            failure.append(exc)

    try:
        thread = threading.Thread(target=worker, name="kc-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(nsfd)
    if failure:
        raise failure[0]
    return result[0]

