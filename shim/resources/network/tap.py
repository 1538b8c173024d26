"""Tap queues through /dev/net/tun (call inside the target netns, see netns.run_in_netns).

One open + TUNSETIFF per queue (IFF_MULTI_QUEUE when queues > 1); the first fd also sets
TUNSETPERSIST so the device outlives the fds (QEMU may exit before detach, and detach after a
crash finds the tap by name). These fds are what QEMU gets via SCM_RIGHTS (``netdev_add
{"type":"tap","fds":"a:b",...}``); the caller owns and closes them.
"""
from __future__ import annotations

import fcntl
import os
import struct

from common.errors import InvalidArgument, ResourceError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
MAX_QUEUES = 256


def tap_flags(queues: int, vnet_hdr: bool = True) -> int:
    flags = IFF_TAP | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if queues > 1:
        flags |= IFF_MULTI_QUEUE
    return flags


def check_ifname(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b" " in raw or b"\0" in raw:
        raise InvalidArgument(f"bad interface name {name!r}")
    return raw


def ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", check_ifname(name), flags)


def open_tap_queues(name: str, queues: int, vnet_hdr: bool = True) -> list[int]:
    """Create (or attach to) tap *name* in the current netns; return one fd per queue."""
    if not 1 <= queues <= MAX_QUEUES:
        raise InvalidArgument(f"queues must be 1..{MAX_QUEUES}, got {queues}")
    req = ifreq(name, tap_flags(queues, vnet_hdr))
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, req)
        fcntl.ioctl(fds[0], TUNSETPERSIST, 1)
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise ResourceError(f"tap {name}: {exc.strerror or exc}") from None
    return fds
