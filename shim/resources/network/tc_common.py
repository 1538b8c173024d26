"""Shared pieces of the two tc-filter backends (pyroute2 general path, Cython fast path).

A backend's ``attach``/``detach`` run INSIDE the pod netns (TcFilterNetwork wraps them in
run_in_netns). ``attach`` marks each step in the state as it succeeds, closes its fds and
raises ResourceError on failure (the caller then rolls back with ``detach``); ``detach``
removes only the steps marked in the state, unmarks them, and treats "already gone" as done.
"""
from __future__ import annotations

import errno
import itertools
import socket
import threading
from typing import Protocol

from shim.resources.network.state import TcFilterState

ETH_P_ALL = 0x0003
INGRESS_HANDLE = 0xFFFF0000
TC_H_INGRESS = 0xFFFFFFF1
U32_CLASSID = 0x10000          # "flowid 1:" — unused on ingress, u32 wants one

# errnos that mean "nothing left to delete"
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.EINVAL, errno.ENXIO})

_seq = itertools.count(1)
_seq_lock = threading.Lock()


def next_seq(n: int = 1) -> int:
    """First of *n* consecutive netlink sequence numbers (process-wide, wraps below 2**31)."""
    with _seq_lock:
        first = next(_seq)
        for _ in range(n - 1):
            next(_seq)
    return first % (1 << 31) or 1


def ifindex(name: str) -> int:
    """ifindex of *name* in the calling thread's netns, 0 if absent."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


class TcBackend(Protocol):
    name: str

    def attach(self, state: TcFilterState, veth_index: int, tap_flags: int) -> list[int]:
        """Create tap + qdiscs + filters; return the tap queue fds."""
        ...

    def detach(self, state: TcFilterState) -> None:
        """Remove what *state* records as created."""
        ...
