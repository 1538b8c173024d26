"""A small rtnetlink client for the guest agent: routes (dump, replace, delete) and neighbours.

stdlib only (``socket`` + ``struct``): the guest has no pyroute2, and busybox ``ip`` can neither
add neighbours nor print a route's protocol (which UpdateRoutes needs to keep kernel routes).
Message builders and parsers are pure functions (unit-tested byte for byte); :class:`Rtnl` owns
one NETLINK_ROUTE socket of the calling thread's network namespace, sends one request at a time
and checks every ack. A kernel errno becomes the matching :mod:`common.errors` class.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterator

from common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KataColoError,
    NotFound,
    PermissionDenied,
    Unavailable,
)

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
NDA_DST, NDA_LLADDR = 1, 2
RT_TABLE_UNSPEC, RT_TABLE_MAIN = 0, 254
RTPROT_KERNEL, RTPROT_BOOT = 2, 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4
NUD_PERMANENT = 0x80

NLMSGHDR = struct.Struct("=IHHII")      # len, type, flags, seq, pid
RTATTR = struct.Struct("=HH")           # len, type
RTMSG = struct.Struct("=BBBBBBBBI")     # family dst_len src_len tos table protocol scope type flags
NDMSG = struct.Struct("=BBHiHBB")       # family pad pad ifindex state flags type
NLMSGERR = struct.Struct("=i")
RECV_SIZE = 1 << 17

_ERRORS: dict[int, type[KataColoError]] = {
    errno.EEXIST: AlreadyExists, errno.ENOENT: NotFound, errno.ESRCH: NotFound,
    errno.ENODEV: NotFound, errno.ENXIO: NotFound, errno.EINVAL: InvalidArgument,
    errno.ERANGE: InvalidArgument, errno.EAFNOSUPPORT: InvalidArgument,
    errno.EOPNOTSUPP: InvalidArgument, errno.EPERM: PermissionDenied, errno.EACCES: PermissionDenied,
    errno.ENETUNREACH: FailedPrecondition, errno.EHOSTUNREACH: FailedPrecondition,
    errno.ENETDOWN: FailedPrecondition, errno.EBUSY: Unavailable, errno.EAGAIN: Unavailable,
}


def netlink_error(err: int, what: str) -> KataColoError:
    """A kernel errno (positive) for ``what`` as the matching common.errors class."""
    return _ERRORS.get(err, Internal)(f"{what}: {os.strerror(err)}")


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, data: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    size = RTATTR.size + len(data)
    return RTATTR.pack(size, kind) + data + b"\0" * (_align(size) - size)


def message(kind: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, flags, seq, pid) + payload


def parse_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each netlink message in one datagram."""
    off = 0
    while off + NLMSGHDR.size <= len(data):
        size, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if size < NLMSGHDR.size or off + size > len(data):
            raise Internal(f"malformed netlink message (len {size} at {off} of {len(data)})")
        yield kind, flags, seq, data[off + NLMSGHDR.size:off + size]
        off += _align(size)


def parse_attrs(data: bytes, off: int = 0) -> dict[int, bytes]:
    """rtattrs from ``off`` on → {type: payload} (the nested bit is masked off)."""
    out: dict[int, bytes] = {}
    while off + RTATTR.size <= len(data):
        size, kind = RTATTR.unpack_from(data, off)
        if size < RTATTR.size:
            break
        out[kind & 0x3FFF] = data[off + RTATTR.size:off + size]
        off += _align(size)
    return out


def _ip_bytes(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def _ip_str(family: int, data: bytes) -> str:
    return socket.inet_ntop(family, data)


@dataclasses.dataclass(frozen=True)
class RouteEntry:
    """One route as the kernel sees it (addresses as text, ``dst`` without the prefix length)."""

    family: int
    dst: str = ""
    dst_len: int = 0
    gateway: str = ""
    oif: int = 0
    prefsrc: str = ""
    scope: int = RT_SCOPE_UNIVERSE
    table: int = RT_TABLE_MAIN
    protocol: int = RTPROT_BOOT
    type: int = RTN_UNICAST
    flags: int = 0
    tos: int = 0
    priority: int | None = None

    @property
    def is_default(self) -> bool:
        return self.dst_len == 0

    def key(self) -> tuple[int, str, int, str, int]:
        """What makes two routes "the same" for UpdateRoutes: destination, gateway, device."""
        return (self.family, self.dst, self.dst_len, self.gateway, self.oif)


def route_message(kind: int, route: RouteEntry, seq: int, flags: int) -> bytes:
    """RTM_NEWROUTE / RTM_DELROUTE for ``route`` (main-table routes carry no RTA_TABLE)."""
    table = route.table if route.table < 256 else RT_TABLE_UNSPEC
    body = RTMSG.pack(route.family, route.dst_len, 0, route.tos, table, route.protocol,
                      route.scope, route.type, route.flags)
    if route.table >= 256:
        body += attr(RTA_TABLE, struct.pack("=I", route.table))
    if route.dst_len:
        body += attr(RTA_DST, _ip_bytes(route.dst))
    if route.gateway:
        body += attr(RTA_GATEWAY, _ip_bytes(route.gateway))
    if route.prefsrc:
        body += attr(RTA_PREFSRC, _ip_bytes(route.prefsrc))
    if route.oif:
        body += attr(RTA_OIF, struct.pack("=i", route.oif))
    if route.priority is not None:
        body += attr(RTA_PRIORITY, struct.pack("=I", route.priority))
    return message(kind, flags, seq, body)


def route_dump_message(family: int, seq: int) -> bytes:
    return message(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))


def parse_route(payload: bytes) -> RouteEntry:
    """An RTM_NEWROUTE payload (rtmsg + attributes) → RouteEntry."""
    family, dst_len, _src_len, tos, table, protocol, scope, kind, flags = RTMSG.unpack_from(payload)
    attrs = parse_attrs(payload, RTMSG.size)
    if RTA_TABLE in attrs:
        table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0]
    addr_family = family if family in (socket.AF_INET, socket.AF_INET6) else 0

    def ip(key: int) -> str:
        return _ip_str(addr_family, attrs[key]) if addr_family and key in attrs else ""

    oif = struct.unpack("=i", attrs[RTA_OIF][:4])[0] if RTA_OIF in attrs else 0
    prio = struct.unpack("=I", attrs[RTA_PRIORITY][:4])[0] if RTA_PRIORITY in attrs else None
    return RouteEntry(family=family, dst=ip(RTA_DST), dst_len=dst_len, gateway=ip(RTA_GATEWAY), oif=oif,
                      prefsrc=ip(RTA_PREFSRC), scope=scope, table=table, protocol=protocol, type=kind,
                      flags=flags, tos=tos, priority=prio)


def neigh_message(ifindex: int, dst: str, lladdr: bytes, state: int, flags: int, seq: int) -> bytes:
    """RTM_NEWNEIGH, create or replace: ndmsg + NDA_DST (+ NDA_LLADDR when given)."""
    ip = ipaddress.ip_address(dst)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = NDMSG.pack(family, 0, 0, ifindex, state, flags, 0) + attr(NDA_DST, ip.packed)
    if lladdr:
        body += attr(NDA_LLADDR, lladdr)
    return message(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq, body)


def check_ack(payload: bytes, what: str) -> None:
    """Raise for an NLMSG_ERROR payload with a non-zero error (0 is the ack)."""
    (err,) = NLMSGERR.unpack_from(payload)
    if err:
        raise netlink_error(-err, what)


class Rtnl:
    """One NETLINK_ROUTE socket in the calling thread's netns. Use as a context manager."""

    _seq = itertools.count(1)

    def __init__(self, *, timeout: float = 10.0) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        except OSError as exc:
            raise netlink_error(exc.errno or errno.EIO, "netlink socket") from None
        try:
            self.sock.settimeout(timeout)
            self.sock.bind((0, 0))
        except OSError as exc:
            self.sock.close()
            raise netlink_error(exc.errno or errno.EIO, "netlink bind") from None

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        return next(self._seq) % (1 << 31) or 1

    def _exchange(self, data: bytes, seq: int, what: str) -> Iterator[tuple[int, bytes]]:
        """Send one request; yield (type, payload) of our replies until the ack or NLMSG_DONE."""
        try:
            self.sock.sendto(data, (0, 0))
            while True:
                chunk = self.sock.recv(RECV_SIZE)
                if not chunk:
                    raise Internal(f"{what}: netlink socket closed")
                for kind, _flags, rseq, payload in parse_messages(chunk):
                    if rseq != seq:
                        continue
                    if kind == NLMSG_ERROR:
                        check_ack(payload, what)
                        return
                    if kind == NLMSG_DONE:
                        if len(payload) >= 4:  # a dump can end with an error
                            check_ack(payload, what)
                        return
                    yield kind, payload
        except TimeoutError:
            raise Internal(f"{what}: no answer from the kernel") from None
        except OSError as exc:
            raise netlink_error(exc.errno or errno.EIO, what) from None

    def request(self, data: bytes, seq: int, what: str) -> None:
        """Send one whole message (built with sequence number ``seq``) and wait for its ack."""
        for _ in self._exchange(data, seq, what):
            pass

    # -- routes -------------------------------------------------------------------------------
    def routes(self, family: int) -> list[RouteEntry]:
        """All routes of ``family``, every table (a kernel without that family answers a
        dump with every family's routes: those are dropped)."""
        seq = self._next_seq()
        found = [parse_route(p) for kind, p in self._exchange(route_dump_message(family, seq), seq, "route dump")
                 if kind == RTM_NEWROUTE]
        return [r for r in found if r.family == family]

    def replace_route(self, route: RouteEntry, what: str) -> None:
        seq = self._next_seq()
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        self.request(route_message(RTM_NEWROUTE, route, seq, flags), seq, what)

    def delete_route(self, route: RouteEntry, what: str) -> None:
        """Delete exactly this route (any scope; its protocol, metric, gateway and device)."""
        seq = self._next_seq()
        gone = dataclasses.replace(route, scope=RT_SCOPE_NOWHERE, prefsrc="", flags=route.flags & RTNH_F_ONLINK)
        self.request(route_message(RTM_DELROUTE, gone, seq, NLM_F_REQUEST | NLM_F_ACK), seq, what)

    # -- neighbours ---------------------------------------------------------------------------
    def replace_neighbor(self, ifindex: int, dst: str, lladdr: bytes, state: int, flags: int, what: str) -> None:
        seq = self._next_seq()
        self.request(neigh_message(ifindex, dst, lladdr, state, flags, seq), seq, what)

    # -- links --------------------------------------------------------------------------------
    @staticmethod
    def index(name: str) -> int:
        """ifindex of ``name`` (NotFound if there is no such link)."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            raise NotFound(f"no link named {name!r}") from None

    @staticmethod
    def name(index: int) -> str:
        try:
            return socket.if_indextoname(index)
        except OSError:
            return ""
