"""The guest side of pod networking without a VM (root): the real agent runs in a throwaway
"guest" netns (``ip netns exec``, so its /sys/class/net is that netns's) with either the host's
iproute2 or busybox as its ``ip`` (the guest image has busybox). A "CNI" netns holds a veth set
up like a CNI plugin leaves it; scan_netns reads it, and GuestAgent.configure_network sends it
to the agent (UpdateInterface, UpdateRoutes, AddARPNeighbors), then UpdateRoutes runs twice
more. ``ip -j`` in the guest netns checks the result. Both namespaces are deleted afterwards.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_api.client.convert import route_from_dict
from agent_api.client.facade import GuestAgent
from agent_api.client.rpc import AgentClient
from common.errors import InvalidArgument, NotFound
from hypervisor.base import AgentAddress
from proto.kata import types_pb2
from shim.resources.network import VethEndpoint, scan_netns
from tests.support.netns import ip

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = shutil.which("busybox")
CNI_MAC = "02:6b:63:00:01:05"
GW_MAC = "02:6b:63:00:01:01"
MTU = 1400

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 not installed"),
]


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", ns, "-j", *args], check=True, capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout or "[]")


@dataclass
class Env:
    cni: str
    guest: str
    tmp: Path
    agent: subprocess.Popen[bytes]

    def address(self) -> AgentAddress:
        return AgentAddress("virtio-serial", path=str(self.tmp / "agent.sock"))

    def log(self) -> str:
        return (self.tmp / "agent.log").read_text(errors="replace")[-4000:]


def make_cni_netns(ns: str) -> None:
    """eth0 as a CNI bridge plugin leaves it: MAC, MTU, v4 + v6 addresses, routes, a static
    neighbour; its peer stays in the same netns (only the scan reads this netns)."""
    ip("netns", "add", ns)
    ip("-n", ns, "link", "add", "eth0", "mtu", str(MTU), "address", CNI_MAC, "type", "veth",
        "peer", "name", "cnipeer")
    ip("-n", ns, "link", "set", "cnipeer", "up")
    ip("-n", ns, "addr", "add", "10.99.0.5/24", "brd", "+", "dev", "eth0")
    ip("-n", ns, "addr", "add", "fd00:99::5/64", "dev", "eth0", "nodad")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "route", "add", "default", "via", "10.99.0.1", "dev", "eth0")
    ip("-n", ns, "route", "add", "192.168.50.0/24", "via", "10.99.0.254", "dev", "eth0")
    ip("-n", ns, "-6", "route", "add", "default", "via", "fd00:99::1", "dev", "eth0")
    ip("-n", ns, "neigh", "add", "10.99.0.1", "lladdr", GW_MAC, "dev", "eth0", "nud", "permanent")
    ip("-n", ns, "neigh", "add", "fd00:99::1", "lladdr", GW_MAC, "dev", "eth0", "nud", "permanent")


def make_guest_netns(ns: str) -> None:
    """The guest's NIC as QEMU presents it: the veth's MAC, another name, no config."""
    ip("netns", "add", ns)
    ip("-n", ns, "link", "add", "ens3", "address", CNI_MAC, "type", "veth", "peer", "name", "gpeer")
    ip("-n", ns, "link", "set", "gpeer", "up")


@pytest.fixture(params=["iproute2", pytest.param("busybox", marks=pytest.mark.skipif(
    BUSYBOX is None, reason="busybox not installed"))])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    tag = f"kc-test-{secrets.token_hex(3)}"
    cni, guest = f"{tag}-cni", f"{tag}-vm"
    tmp = Path(tempfile.mkdtemp(prefix="kca-net-"))
    path = os.environ["PATH"]
    if request.param == "busybox":
        (tmp / "bin").mkdir()
        os.symlink(BUSYBOX, tmp / "bin" / "ip")  # type: ignore[arg-type]
        path = f"{tmp / 'bin'}:{path}"
    agent: subprocess.Popen[bytes] | None = None
    rc = 0
    try:
        make_cni_netns(cni)
        make_guest_netns(guest)
        with open(tmp / "agent.log", "wb") as log:
            agent = subprocess.Popen(
                ["ip", "netns", "exec", guest, "env", f"PATH={path}", sys.executable, "-m", "agent_api.agent",
                 "--listen", f"unix:{tmp / 'agent.sock'}", "--state-dir", str(tmp / "state"),
                 "--shared-dir", str(tmp / "shared"), "--cgroup-parent", f"/kata-colo-{tag}",
                 "--no-serial", "--no-vsock", "--cmdline", "/dev/null", "--log-level", "debug"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        yield Env(cni, guest, tmp, agent)
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                rc = agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                rc = agent.wait()
        agent_log = (tmp / "agent.log").read_text(errors="replace") if (tmp / "agent.log").exists() else ""
        for ns in (cni, guest):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    assert rc == 0, f"agent exited {rc}\n{agent_log[-4000:]}"


@pytest.fixture
async def guest_agent(env: Env) -> AsyncIterator[GuestAgent]:
    g = GuestAgent(env.address())
    try:
        await g.client.wait_ready(30)
    except Exception:
        pytest.fail(f"agent did not start:\n{env.log()}")
    yield g
    await g.close()


def routes(ns: str, family: str) -> set[tuple[str, str, str, str]]:
    return {(r["dst"], r.get("gateway", ""), r.get("dev", ""), r.get("protocol", "boot"))
            for r in ip_json(ns, family, "route", "show")}


def check_guest(env: Env) -> None:
    [link] = [x for x in ip_json(env.guest, "addr", "show") if x["address"] == CNI_MAC]
    assert link["ifname"] == "eth0" and link["mtu"] == MTU and "UP" in link["flags"]
    assert "NOARP" not in link["flags"]
    addrs = {(a["local"], a["prefixlen"], a.get("broadcast", "")) for a in link["addr_info"]}
    assert {("10.99.0.5", 24, "10.99.0.255"), ("fd00:99::5", 64, "")} <= addrs
    assert not [a for a in link["addr_info"] if a["family"] == "inet" and a["local"] != "10.99.0.5"]
    neigh = {(n["dst"], n.get("lladdr"), tuple(n.get("state", []))) for n in ip_json(env.guest, "neigh", "show")}
    assert {("10.99.0.1", GW_MAC, ("PERMANENT",)), ("fd00:99::1", GW_MAC, ("PERMANENT",))} <= neigh


async def test_configure_network_from_cni_scan(env: Env, guest_agent: GuestAgent) -> None:
    [ep] = [e for e in scan_netns(f"/var/run/netns/{env.cni}") if e.name == "eth0"]
    assert isinstance(ep, VethEndpoint) and ep.mac == CNI_MAC
    await guest_agent.configure_network([ep.to_agent_interface("eth0")], ep.to_agent_routes("eth0"),
                                        ep.to_agent_neighbors("eth0"))
    check_guest(env)
    v4 = routes(env.guest, "-4")
    assert {("default", "10.99.0.1", "eth0", "boot"), ("192.168.50.0/24", "10.99.0.254", "eth0", "boot"),
            ("10.99.0.0/24", "", "eth0", "kernel")} <= v4, v4
    assert ("default", "fd00:99::1", "eth0", "boot") in routes(env.guest, "-6")
    client: AgentClient = guest_agent.client

    # the same routes again: replaced, not "File exists"
    await client.update_routes([route_from_dict(d) for d in ep.to_agent_routes("eth0")])
    assert routes(env.guest, "-4") == v4

    # other routes: the old non-kernel ones go, the kernel's subnet routes stay
    new = [types_pb2.Route(dest="172.16.0.0/12", gateway="10.99.0.254", device="eth0"),
           types_pb2.Route(gateway="10.99.0.1", device="eth0"),
           types_pb2.Route(dest="169.254.7.7", device="eth0"),
           types_pb2.Route(dest="2001:db8:7::/48", gateway="fd00:99::1", device="eth0", family=types_pb2.v6)]
    listed = await client.update_routes(new)
    v4 = routes(env.guest, "-4")
    assert v4 == {("default", "10.99.0.1", "eth0", "boot"), ("172.16.0.0/12", "10.99.0.254", "eth0", "boot"),
                  ("169.254.7.7", "", "eth0", "boot"), ("10.99.0.0/24", "", "eth0", "kernel")}, v4
    v6 = routes(env.guest, "-6")
    assert ("2001:db8:7::/48", "fd00:99::1", "eth0", "boot") in v6
    assert ("fd00:99::/64", "", "eth0", "kernel") in v6
    assert not [r for r in v6 if r[0] == "default"], v6
    assert {(r.dest, r.gateway, r.device) for r in listed} >= {
        ("172.16.0.0/12", "10.99.0.254", "eth0"), ("", "10.99.0.1", "eth0"), ("10.99.0.0/24", "", "eth0"),
        ("2001:db8:7::/48", "fd00:99::1", "eth0")}
    assert {(r.dest, r.gateway) for r in await client.list_routes()} == {(r.dest, r.gateway) for r in listed}

    # neighbours are replaced in place; errors are typed and change nothing
    await client.add_arp_neighbors([types_pb2.ARPNeighbor(
        toIPAddress=types_pb2.IPAddress(address="10.99.0.1"), device="eth0", lladdr="02:6b:63:00:01:99")])
    assert ("10.99.0.1", "02:6b:63:00:01:99") in {(n["dst"], n.get("lladdr")) for n in ip_json(env.guest, "neigh")}
    with pytest.raises(NotFound):
        await client.add_arp_neighbors([types_pb2.ARPNeighbor(
            toIPAddress=types_pb2.IPAddress(address="10.99.0.2"), device="ens3", lladdr=GW_MAC)])
    with pytest.raises(InvalidArgument):
        await client.update_routes([types_pb2.Route(dest="10.0.0.0/8", gateway="fd00::1", device="eth0")])
    assert routes(env.guest, "-4") == v4

    # UpdateInterface again (same MAC, already named eth0) keeps working; ListInterfaces agrees
    iface = await client.update_interface(types_pb2.Interface(
        name="eth0", hwAddr=CNI_MAC, mtu=1300, IPAddresses=[types_pb2.IPAddress(address="10.99.0.6", mask="24")]))
    assert iface.mtu == 1300 and [a.address for a in iface.IPAddresses if a.family == types_pb2.v4] == ["10.99.0.6"]
    listed_ifaces = {i.name: i for i in await client.list_interfaces()}
    assert listed_ifaces["eth0"].hwAddr == CNI_MAC and "ens3" not in listed_ifaces
