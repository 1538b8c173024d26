"""The agent's stdlib rtnetlink client: message bytes (checked against hand-written kernel ABI
layouts), parsing of real kernel route messages, acks and errno mapping, and one harmless
round trip through a real NETLINK_ROUTE socket."""
from __future__ import annotations

import errno
import socket
import struct

import pytest

from agent_api.agent import netlink as nl
from agent_api.agent.netlink import RouteEntry
from common.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound, PermissionDenied


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def test_neigh_message_ipv4_bytes() -> None:
    got = nl.neigh_message(3, "192.0.2.1", h("020000000001"), nl.NUD_PERMANENT, 0, seq=5)
    assert got == h("""
        30000000 1c00 0505 05000000 00000000
        02 00 0000 03000000 8000 00 00
        0800 0100 c0000201
        0a00 0200 020000000001 0000
    """)
    # nlmsghdr: len 48, RTM_NEWNEIGH (28), REQUEST|ACK|REPLACE|CREATE; ndmsg AF_INET ifindex 3
    # NUD_PERMANENT; NDA_DST 192.0.2.1; NDA_LLADDR padded to 4 bytes


def test_neigh_message_ipv6_without_lladdr() -> None:
    got = nl.neigh_message(7, "2001:db8::1", b"", 0x40, 0x08, seq=0x01020304)
    assert got == h("""
        30000000 1c00 0505 04030201 00000000
        0a 00 0000 07000000 4000 08 00
        1400 0100 20010db8000000000000000000000001
    """)


def test_route_message_replace_bytes() -> None:
    r = RouteEntry(family=socket.AF_INET, dst="10.1.0.0", dst_len=16, gateway="192.0.2.254",
                   prefsrc="192.0.2.2", oif=3, flags=nl.RTNH_F_ONLINK)
    got = nl.route_message(nl.RTM_NEWROUTE, r, 9, nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE
                           | nl.NLM_F_REPLACE)
    assert got == h("""
        3c000000 1800 0505 09000000 00000000
        02 10 00 00 fe 03 00 01 04000000
        0800 0100 0a010000
        0800 0500 c00002fe
        0800 0700 c0000202
        0800 0400 03000000
    """)
    # rtmsg: AF_INET /16 table main proto boot scope universe unicast, RTNH_F_ONLINK


def test_route_message_ipv6_default_other_table_with_metric() -> None:
    r = RouteEntry(family=socket.AF_INET6, gateway="fe80::1", oif=2, table=1000, priority=1024)
    got = nl.route_message(nl.RTM_DELROUTE, r, 1, nl.NLM_F_REQUEST | nl.NLM_F_ACK)
    assert got == h("""
        48000000 1900 0500 01000000 00000000
        0a 00 00 00 00 03 00 01 00000000
        0800 0f00 e8030000
        1400 0500 fe800000000000000000000000000001
        0800 0400 02000000
        0800 0600 00040000
    """)


def test_route_dump_message() -> None:
    assert nl.route_dump_message(socket.AF_INET6, 3) == h(
        "1c000000 1a00 0103 03000000 00000000 0a000000 00000000 00000000")


# RTM_NEWROUTE payloads as a 6.1 kernel sent them for `ip route` in a test netns:
# "default via 192.0.2.1 dev v0" (link down), "10.0.0.0/8 via 192.0.2.9 dev v0 metric 7 onlink",
# "192.0.2.0/24 dev v0 proto kernel scope link src 192.0.2.2"
KERNEL_ROUTES = [
    "02000000fe0300011000000008000f00fe00000008000500c00002010800040003000000",
    "02080000fe0300011400000008000f00fe000000080001000a000000080006000700000008000500c00002090800040003000000",
    "02180000fe02fd011000000008000f00fe00000008000100c000020008000700c00002020800040003000000",
]


def test_parse_kernel_routes() -> None:
    default, via, kernel = (nl.parse_route(bytes.fromhex(p)) for p in KERNEL_ROUTES)
    assert default == RouteEntry(family=socket.AF_INET, gateway="192.0.2.1", oif=3, flags=0x10)
    assert default.is_default and default.table == nl.RT_TABLE_MAIN
    assert (via.dst, via.dst_len, via.gateway, via.priority, via.flags & nl.RTNH_F_ONLINK) == (
        "10.0.0.0", 8, "192.0.2.9", 7, nl.RTNH_F_ONLINK)
    assert (kernel.dst, kernel.dst_len, kernel.prefsrc, kernel.scope, kernel.protocol) == (
        "192.0.2.0", 24, "192.0.2.2", nl.RT_SCOPE_LINK, nl.RTPROT_KERNEL)
    assert kernel.key() == (socket.AF_INET, "192.0.2.0", 24, "", 3)


def test_route_message_round_trips_through_the_parser() -> None:
    r = RouteEntry(family=socket.AF_INET6, dst="2001:db8::", dst_len=64, gateway="2001:db8::1",
                   oif=4, scope=0, priority=256, table=300)
    msg = nl.route_message(nl.RTM_NEWROUTE, r, 1, 0)
    [(kind, _flags, seq, payload)] = list(nl.parse_messages(msg))
    assert (kind, seq) == (nl.RTM_NEWROUTE, 1)
    assert nl.parse_route(payload) == r


def test_parse_messages_and_acks() -> None:
    ack = nl.message(nl.NLMSG_ERROR, 0, 4, struct.pack("=i", 0) + b"\0" * 16)
    eexist = nl.message(nl.NLMSG_ERROR, 0, 5, struct.pack("=i", -errno.EEXIST) + b"\0" * 16)
    done = nl.message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 6, struct.pack("=i", 0))
    msgs = list(nl.parse_messages(ack + eexist + done))
    assert [(k, s) for k, _f, s, _p in msgs] == [(nl.NLMSG_ERROR, 4), (nl.NLMSG_ERROR, 5), (nl.NLMSG_DONE, 6)]
    nl.check_ack(msgs[0][3], "x")
    with pytest.raises(AlreadyExists, match="add route: File exists"):
        nl.check_ack(msgs[1][3], "add route")
    with pytest.raises(Internal, match="malformed"):
        list(nl.parse_messages(ack[:-4]))


@pytest.mark.parametrize("err,cls", [
    (errno.EEXIST, AlreadyExists), (errno.ENODEV, NotFound), (errno.ESRCH, NotFound),
    (errno.EINVAL, InvalidArgument), (errno.EPERM, PermissionDenied),
    (errno.ENETUNREACH, FailedPrecondition), (errno.EIO, Internal)])
def test_errno_mapping(err: int, cls: type) -> None:
    exc = nl.netlink_error(err, "add neighbor 192.0.2.1 dev eth0")
    assert type(exc) is cls and exc.message.startswith("add neighbor 192.0.2.1 dev eth0: ")


def test_parse_attrs_masks_nested_bit_and_stops_on_garbage() -> None:
    data = nl.attr(0x8000 | 3, b"ab") + struct.pack("=HH", 2, 9)
    assert nl.parse_attrs(data) == {3: b"ab"}


def test_real_socket_dump_and_kernel_error() -> None:
    """Read-only dump of this netns, then a neighbour on an ifindex that cannot exist: the
    kernel's errno comes back typed (NotFound as root, PermissionDenied otherwise)."""
    with nl.Rtnl() as rtnl:
        routes = rtnl.routes(socket.AF_INET)
        assert all(r.family == socket.AF_INET for r in routes)
        with pytest.raises((NotFound, PermissionDenied)):
            rtnl.replace_neighbor(0x7FFFFFF0, "192.0.2.1", h("020000000001"), nl.NUD_PERMANENT, 0, "neigh")
        assert rtnl.index("lo") == 1 or rtnl.name(rtnl.index("lo")) == "lo"
        with pytest.raises(NotFound):
            rtnl.index("no-such-link0")
        assert rtnl.name(0x7FFFFFF0) == ""
