"""Bytes of the fast-path netlink messages, against the kernel struct layouts and against what
pyroute2 0.9 builds for the same requests (so both paths program identical filters)."""
from __future__ import annotations

import struct

import pytest

from shim.resources.network import tap

nl = pytest.importorskip("shim._speedups.netlink", reason="Cython extension not built")

NEW = 0x1 | 0x4 | 0x200 | 0x400   # REQUEST|ACK|EXCL|CREATE
DEL = 0x1 | 0x4


def nla(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def tcmsg(ifindex: int, handle: int, parent: int, info: int) -> bytes:
    return struct.pack("=BxxxiIII", 0, ifindex, handle, parent, info)


def test_ingress_qdisc_layout() -> None:
    want = nlmsg(36, NEW, 7, tcmsg(5, 0xFFFF0000, 0xFFFFFFF1, 0) + nla(1, b"ingress\0"))
    assert nl.build_ingress_qdisc(7, 5) == want
    assert len(want) == 0x30


def test_ingress_qdisc_delete_layout() -> None:
    want = nlmsg(37, DEL, 8, tcmsg(9, 0xFFFF0000, 0xFFFFFFF1, 0) + nla(1, b"ingress\0"))
    assert nl.build_ingress_qdisc(8, 9, True) == want


def test_u32_mirred_redirect_layout() -> None:
    # struct tc_mirred: index, capab, action=TC_ACT_STOLEN, refcnt, bindcnt, eaction, ifindex
    parms = struct.pack("=IIiiiiI", 0, 0, 4, 0, 0, 1, 7)
    act = nla(1, b"mirred\0") + nla(2 | 0x8000, nla(2, parms))
    sel = struct.pack("=BBBxHhhhI", 1, 0, 1, 0, 0, 0, 0, 0) + struct.pack("=IIii", 0, 0, 0, 0)
    opts = nla(7, nla(1, act)) + nla(1, struct.pack("=I", 0x10000)) + nla(5, sel)
    info = (3 << 16) | 0x0300          # prio 3, htons(ETH_P_ALL)
    want = nlmsg(44, NEW, 11, tcmsg(5, 0, 0xFFFF0000, info) + nla(1, b"u32\0") + nla(2, opts))
    assert nl.build_u32_redirect(11, 5, 7, 3) == want


def test_filter_delete_layout() -> None:
    want = nlmsg(45, DEL, 2, tcmsg(4, 0, 0xFFFF0000, (1 << 16) | 0x0300) + nla(1, b"u32\0"))
    assert nl.build_filter_delete(2, 4, 1) == want


def test_link_up_mtu_and_delete_layout() -> None:
    ifi = struct.pack("=BxHiII", 0, 0, 12, 1, 1)
    assert nl.build_link_up_mtu(3, 12, 1400) == nlmsg(16, DEL, 3, ifi + nla(4, struct.pack("=I", 1400)))
    ifi0 = struct.pack("=BxHiII", 0, 0, 0, 0, 0)
    assert nl.build_link_delete(4, b"tap0_kata") == nlmsg(17, DEL, 4, ifi0 + nla(3, b"tap0_kata\0"))


@pytest.fixture(scope="module")
def ipbatch():  # type: ignore[no-untyped-def]
    from pyroute2 import IPBatch

    batch = IPBatch()
    yield batch
    batch.close()


def _strip_seq(msg: bytes) -> bytes:
    return msg[:8] + msg[16:]


def test_same_bytes_as_pyroute2_qdisc(ipbatch) -> None:  # type: ignore[no-untyped-def]
    ipbatch.reset()
    ipbatch.tc("add", "ingress", 5, 0xFFFF0000)
    assert _strip_seq(bytes(ipbatch.batch)) == _strip_seq(nl.build_ingress_qdisc(0, 5))


def test_same_bytes_as_pyroute2_filter(ipbatch) -> None:  # type: ignore[no-untyped-def]
    ipbatch.reset()
    ipbatch.tc("add-filter", "u32", 5, parent=0xFFFF0000, protocol=3, prio=1, target=0x10000,
               keys=["0x0/0x0+0"], action={"kind": "mirred", "direction": "egress",
                                           "action": "redirect", "ifindex": 9})
    assert _strip_seq(bytes(ipbatch.batch)) == _strip_seq(nl.build_u32_redirect(0, 5, 9, 1))


def test_tap_ifreq_and_flags() -> None:
    assert tap.tap_flags(1) == 0x2 | 0x1000 | 0x4000
    assert tap.tap_flags(4) == 0x2 | 0x1000 | 0x4000 | 0x100
    assert tap.tap_flags(1, vnet_hdr=False) == 0x1002
    req = tap.ifreq("tap0_kata", 0x5002)
    assert len(req) == 40 and req[:16] == b"tap0_kata".ljust(16, b"\0")
    assert struct.unpack_from("=H", req, 16)[0] == 0x5002


def test_bad_names_rejected() -> None:
    from common.errors import InvalidArgument

    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(InvalidArgument):
            tap.check_ifname(bad)
    with pytest.raises(ValueError):
        nl.open_tap_queues(b"x" * 16, 1, 0x1002)
