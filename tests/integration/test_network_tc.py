"""tc-filter attach/detach in real network namespaces (root).

Each test builds its own pair of namespaces, kc-test-<rand>-pod (the "CNI" side: eth0 with
MAC/MTU/IPs/default route/static neighbour, like a CNI plugin leaves it) and kc-test-<rand>-peer
(the other veth end, standing in for the host). Frames only ever travel inside that pair.
Both namespaces are deleted on teardown, which also removes every link in them.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import secrets
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from common.errors import InvalidArgument, NotFound, ResourceError
from shim.resources.network import TcFilterNetwork, VethEndpoint, scan_netns
from shim.resources.network.netns import run_in_netns
from shim.resources.network.tc_fast import load_speedups
from tests.support.netns import ip, ns_sh

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, tap, tc)"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None,
                       reason="iproute2 not installed"),
]

BACKENDS = [
    "pyroute2",
    pytest.param("cython", marks=pytest.mark.skipif(load_speedups() is None,
                                                    reason="Cython extension not built")),
]

POD_MAC = "02:6b:63:00:00:02"
PEER_MAC = "02:6b:63:00:00:01"
MTU = 1400
ETH_P_TEST = 0x88B5          # IEEE local experimental ethertype
VNET_HDR_LEN = 10            # struct virtio_net_hdr (IFF_VNET_HDR, default size)


@dataclass
class NsPair:
    pod: str
    peer: str

    @property
    def pod_path(self) -> str:
        return f"/var/run/netns/{self.pod}"

    @property
    def peer_path(self) -> str:
        return f"/var/run/netns/{self.peer}"

    def sh(self, cmd: str, ns: str | None = None) -> str:
        return ns_sh(ns or self.pod, "sh", "-c", cmd)


@pytest.fixture
def nspair() -> Iterator[NsPair]:
    tag = f"kc-test-{secrets.token_hex(3)}"
    pair = NsPair(pod=f"{tag}-pod", peer=f"{tag}-peer")
    try:
        ip("netns", "add", pair.pod)
        ip("netns", "add", pair.peer)
        ip("-n", pair.pod, "link", "add", "eth0", "mtu", str(MTU), "address", POD_MAC,
            "type", "veth", "peer", "name", "peer0", "netns", pair.peer)
        ip("-n", pair.peer, "link", "set", "peer0", "address", PEER_MAC, "mtu", str(MTU), "up")
        ip("-n", pair.pod, "link", "set", "lo", "up")
        # no duplicate address detection: snapshots must not race "tentative" addresses
        subprocess.run(["ip", "netns", "exec", pair.pod, "sysctl", "-qw",
                        "net.ipv6.conf.eth0.accept_dad=0"], check=True, timeout=30)
        ip("-n", pair.pod, "addr", "add", "10.231.0.2/24", "dev", "eth0")
        ip("-n", pair.pod, "addr", "add", "fd00:231::2/64", "dev", "eth0", "nodad")
        ip("-n", pair.pod, "link", "set", "eth0", "up")
        ip("-n", pair.pod, "route", "add", "default", "via", "10.231.0.1")
        ip("-n", pair.pod, "neigh", "add", "10.231.0.1", "lladdr", PEER_MAC, "dev", "eth0",
            "nud", "permanent")
        yield pair
    finally:
        for ns in (pair.pod, pair.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _snapshot_once(pair: NsPair) -> dict[str, str]:
    return {
        "link": re.sub(r"link-netns \S+", "", pair.sh("ip -d link show")),
        "addr": pair.sh("ip addr show"),
        "route": pair.sh("ip route show table all"),
        "neigh": pair.sh("ip neigh show nud permanent"),
        "qdisc": pair.sh("tc qdisc show"),
        "filter": pair.sh("tc filter show dev eth0 ingress"),
    }


def snapshot(pair: NsPair) -> dict[str, str]:
    """Everything CNI set up, as text, for a before/after comparison; waits until the kernel's
    asynchronous work (IPv6 link-local address, multicast routes, carrier) has settled."""
    deadline = time.monotonic() + 10
    last = _snapshot_once(pair)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _snapshot_once(pair)
        if now == last and "tentative" not in now["addr"]:
            return now
        last = now
    raise AssertionError("netns never settled")


def assert_same(before: dict[str, str], after: dict[str, str]) -> None:
    diff = [line for key in before for line in difflib.unified_diff(
        before[key].splitlines(), after[key].splitlines(), f"before:{key}", f"after:{key}",
        lineterm="")]
    assert not diff, "\n".join(diff)


def tc_filters(pair: NsPair, dev: str) -> str:
    return pair.sh(f"tc filter show dev {dev} ingress")


def the_endpoint(pair: NsPair) -> VethEndpoint:
    endpoints = scan_netns(pair.pod_path)
    assert [e.name for e in endpoints] == ["eth0"]
    return endpoints[0]


# ------------------------------------------------------------------------------ scan

def test_scan_reads_what_cni_left(nspair: NsPair) -> None:
    ep = the_endpoint(nspair)
    assert (ep.mac, ep.mtu, ep.ifindex > 0) == (POD_MAC, MTU, True)
    assert {(a.address, a.prefixlen) for a in ep.addrs} == {("10.231.0.2", 24),
                                                            ("fd00:231::2", 64)}
    routes = ep.to_agent_routes()
    assert routes[-1]["dest"] == "" and routes[-1]["gateway"] == "10.231.0.1"
    assert {"10.231.0.0/24", "fd00:231::/64"} <= {r["dest"] for r in routes}
    assert [n["toIPAddress"]["address"] for n in ep.to_agent_neighbors()] == ["10.231.0.1"]


# ------------------------------------------------------------------------------ attach

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("queues", [1, 2])
def test_attach_programs_redirects_and_detach_restores(nspair: NsPair, backend: str,
                                                      queues: int) -> None:
    before = snapshot(nspair)
    net = TcFilterNetwork(nspair.pod_path, backend=backend)  # type: ignore[arg-type]
    att = net.attach(the_endpoint(nspair), queues=queues)
    try:
        assert (att.tap_name, att.guest_mac, len(att.fds)) == ("tap0_kata", POD_MAC, queues)
        veth_f, tap_f = tc_filters(nspair, "eth0"), tc_filters(nspair, "tap0_kata")
        assert "mirred (Egress Redirect to device tap0_kata) stolen" in veth_f
        assert "mirred (Egress Redirect to device eth0) stolen" in tap_f
        assert "match 00000000/00000000 at 0" in veth_f
        link = json.loads(nspair.sh("ip -j -d link show tap0_kata"))[0]
        assert link["mtu"] == MTU and "UP" in link["flags"]
        info = link["linkinfo"]["info_data"]
        assert (info["type"], info["pi"], info["vnet_hdr"]) == ("tap", False, True)
        assert info.get("multi_queue", False) == (queues > 1)
        # the tap does not count as an endpoint
        assert [e.name for e in scan_netns(nspair.pod_path)] == ["eth0"]
        # the record is enough to clean up after a crash: new object, our fds closed
        saved = net.to_json()
    finally:
        att.close_fds()
    TcFilterNetwork.from_json(saved, backend=backend).detach()  # type: ignore[arg-type]
    assert_same(before, snapshot(nspair))
    net.detach()        # the original object: everything is already gone
    net.detach()
    assert net.attachments == []
    assert_same(before, snapshot(nspair))


def test_both_backends_program_identical_filters(nspair: NsPair) -> None:
    if load_speedups() is None:
        pytest.skip("Cython extension not built")
    shown: dict[str, tuple[str, str, str]] = {}
    for backend in ("pyroute2", "cython"):
        net = TcFilterNetwork(nspair.pod_path, backend=backend)  # type: ignore[arg-type]
        att = net.attach(the_endpoint(nspair))
        try:
            shown[backend] = (tc_filters(nspair, "eth0"), tc_filters(nspair, "tap0_kata"),
                              nspair.sh("tc qdisc show"))
        finally:
            att.close_fds()
            net.detach()
    assert shown["pyroute2"] == shown["cython"]
    assert "Egress Redirect" in shown["cython"][0]


# ------------------------------------------------------------------------------ traffic

def _peer_socket(pair: NsPair) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
        s.bind(("peer0", ETH_P_TEST))
        s.settimeout(3)
        return s
    return run_in_netns(pair.peer_path, make)


def _frame(dst: str, src: str, payload: bytes) -> bytes:
    return (bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
            + struct.pack("!H", ETH_P_TEST) + payload.ljust(46, b"\0"))


def _read_tap(fds: list[int], marker: bytes, timeout: float = 3.0) -> bytes:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(fds, [], [], left)
        for fd in ready:
            data = os.read(fd, 65536)
            if marker in data:
                return data
    raise AssertionError("frame never reached the tap")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("queues", [1, 2])
def test_frames_flow_both_ways(nspair: NsPair, backend: str, queues: int) -> None:
    net = TcFilterNetwork(nspair.pod_path, backend=backend)  # type: ignore[arg-type]
    att = net.attach(the_endpoint(nspair), queues=queues)
    peer = _peer_socket(nspair)
    try:
        # host side -> veth ingress -> redirect -> tap egress -> tap fd (what QEMU reads)
        inbound = f"to-guest-{secrets.token_hex(4)}".encode()
        frame = _frame(POD_MAC, PEER_MAC, inbound)
        peer.send(frame)
        got = _read_tap(att.fds, inbound)
        assert got[VNET_HDR_LEN:] == frame

        # tap fd (what QEMU writes) -> tap ingress -> redirect -> veth egress -> peer
        outbound = f"from-guest-{secrets.token_hex(4)}".encode()
        frame = _frame(PEER_MAC, att.guest_mac, outbound)
        os.write(att.fds[-1], bytes(VNET_HDR_LEN) + frame)
        while True:
            data = peer.recv(65536)
            if outbound in data:
                break
        assert data == frame
    finally:
        peer.close()
        att.close_fds()
        net.detach()
    assert tc_filters(nspair, "eth0") == ""


# ------------------------------------------------------------------------------ failures

@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_attach_removes_only_its_own_pieces(nspair: NsPair, backend: str) -> None:
    nspair.sh("tc qdisc add dev eth0 ingress")   # somebody else's qdisc: attach must fail
    before = snapshot(nspair)
    net = TcFilterNetwork(nspair.pod_path, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ResourceError, match="qdisc"):
        net.attach(the_endpoint(nspair))
    assert net.attachments == []
    assert_same(before, snapshot(nspair))            # tap gone, foreign qdisc still there
    assert "ingress ffff:" in before["qdisc"]


def test_attach_refuses_missing_veth_and_taken_tap(nspair: NsPair) -> None:
    ep = the_endpoint(nspair)
    net = TcFilterNetwork(nspair.pod_path, backend="pyroute2")
    with pytest.raises(NotFound):
        net.attach(VethEndpoint("eth9", ep.mac, ep.mtu))
    nspair.sh("ip tuntap add dev tap0_kata mode tap")
    with pytest.raises(Exception, match="already exists"):
        net.attach(ep)
    assert "tap0_kata" in nspair.sh("ip link show tap0_kata")   # not ours: left alone
    assert tc_filters(nspair, "eth0") == ""


def test_invalid_netns_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound, match="does not exist"):
        scan_netns(f"/var/run/netns/kc-test-missing-{secrets.token_hex(3)}")
    with pytest.raises(InvalidArgument, match="directory"):
        scan_netns(str(tmp_path))
    plain = tmp_path / "not-a-netns"
    plain.write_text("x")
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        scan_netns(str(plain))
    with pytest.raises(InvalidArgument):
        TcFilterNetwork("cni-1234")


def test_pod_network_setup_nics_guest_config_and_teardown(nspair: NsPair) -> None:
    from shim.resources.network.pod import PodNetwork

    before = snapshot(nspair)
    pod = PodNetwork.setup(nspair.pod_path, queues=2)
    try:
        (nic,) = pod.nics()
        assert nic.id == "net0" and nic.mac == POD_MAC and len(nic.tap_fds) == 2
        assert "mirred" in tc_filters(nspair, "eth0") and "mirred" in tc_filters(nspair, "tap0_kata")
        interfaces, routes, neighbors = pod.guest_config()
        assert interfaces[0]["hwAddr"] == POD_MAC and interfaces[0]["mtu"] == MTU
        assert {a["address"] for a in interfaces[0]["IPAddresses"]} == {"10.231.0.2", "fd00:231::2"}
        assert routes[-1]["dest"] == "" and routes[-1]["gateway"] == "10.231.0.1"
        assert [n["lladdr"] for n in neighbors] == [PEER_MAC]
        # a crash between setup and teardown: the persisted JSON alone undoes it
        saved = pod.to_json()
        pod.close_fds()
        PodNetwork.cleanup_json(saved)
        assert_same(before, snapshot(nspair))
    finally:
        pod.teardown()
    assert_same(before, snapshot(nspair))
    assert not pod.taps


def test_pod_network_setup_failure_leaves_nothing(nspair: NsPair) -> None:
    from shim.resources.network.pod import PodNetwork

    before = snapshot(nspair)
    nspair.sh("ip tuntap add dev tap0_kata mode tap")  # the tap name is taken: attach must fail
    with pytest.raises(Exception):  # noqa: B017 - any failure, as long as nothing is left
        PodNetwork.setup(nspair.pod_path)
    nspair.sh("ip link del tap0_kata")
    assert_same(before, snapshot(nspair))
