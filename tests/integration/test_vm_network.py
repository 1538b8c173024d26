"""The guest side of pod networking in a real VM (TCG): a tap in a throwaway netns is the VM's
virtio-net NIC; GuestAgent.configure_network gives the guest the pod's interface, routes and
static neighbour (as the shim does from the CNI veth), twice; the agent's busybox ``ip`` and
rtnetlink code run in the guest; the netns then pings the guest's IPv4 and IPv6 addresses."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time

import pytest

from agent_api.client.rpc import AgentClient
from hypervisor.base import NetDevice
from proto.kata import types_pb2
from shim.resources.network.endpoint import NUD_PERMANENT, RT_SCOPE_LINK, IPAddr, Neighbor, Route, VethEndpoint
from shim.resources.network.netns import run_in_netns
from shim.resources.network.tap import open_tap_queues
from tests.support.booted_vm import IMAGE, booted_vm
from tests.support.netns import ns_run

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(not (IMAGE / "manifest.json").exists(), reason="guest image not built"),
              pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")]

BUSYBOX = shutil.which("busybox")  # its ping: the host has no iputils (busybox-static is a setup package)
GUEST_MAC = "02:6b:63:00:02:05"
HOST_MAC = "02:6b:63:00:02:01"


def pod_endpoint() -> VethEndpoint:
    """What scan_netns would report for the pod's veth (the tap's netns plays the gateway)."""
    return VethEndpoint(
        name="eth0", mac=GUEST_MAC, mtu=1400,
        addrs=(IPAddr("10.99.0.5", 24), IPAddr("fd00:99::5", 64)),
        routes=(Route(dest="", gateway="10.99.0.1"),
                Route(dest="10.99.0.0/24", source="10.99.0.5", scope=RT_SCOPE_LINK),
                Route(dest="192.168.50.0/24", gateway="10.99.0.254"),
                Route(dest="fd00:99::/64", family=1),
                Route(dest="", gateway="fd00:99::1", family=1)),
        neighbors=(Neighbor("10.99.0.1", HOST_MAC, NUD_PERMANENT),))


def ping(ns: str, addr: str, deadline: float) -> subprocess.CompletedProcess[str]:
    while True:  # IPv6 DAD in the guest takes about a second
        out = ns_run(ns, BUSYBOX or "busybox", "ping", "-c", "2", "-W", "3", addr, check=False)
        if out.returncode == 0 or time.monotonic() > deadline:
            return out


async def test_vm_guest_network_from_endpoint() -> None:
    ns = f"kc-test-{secrets.token_hex(3)}-pod"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        [fd] = run_in_netns(f"/var/run/netns/{ns}", lambda: open_tap_queues("tap0", 1))
        for cmd in (["ip", "link", "set", "tap0", "address", HOST_MAC, "mtu", "1400", "up"],
                    ["ip", "addr", "add", "10.99.0.1/24", "dev", "tap0"],
                    ["ip", "addr", "add", "fd00:99::1/64", "dev", "tap0", "nodad"]):
            ns_run(ns, *cmd)
        async with booted_vm(1, "kcnet", nics=(NetDevice(id="nic0", mac=GUEST_MAC, tap_fds=(fd,)),)) as vm:
            os.close(fd)
            ep = pod_endpoint()
            for _ in range(2):  # a second configuration replaces the first without errors
                await vm.guest.configure_network([ep.to_agent_interface("eth0")], ep.to_agent_routes("eth0"),
                                                 ep.to_agent_neighbors("eth0"))
            client: AgentClient = vm.guest.client
            ifaces = {i.name: i for i in await client.list_interfaces()}
            eth0 = ifaces["eth0"]
            assert eth0.hwAddr == GUEST_MAC and eth0.mtu == 1400 and eth0.raw_flags & 1  # IFF_UP
            assert {(a.address, a.mask) for a in eth0.IPAddresses} >= {("10.99.0.5", "24"), ("fd00:99::5", "64")}
            routes = {(r.dest, r.gateway, r.device, r.family) for r in await client.list_routes()}
            assert {("", "10.99.0.1", "eth0", types_pb2.v4), ("192.168.50.0/24", "10.99.0.254", "eth0", types_pb2.v4),
                    ("10.99.0.0/24", "", "eth0", types_pb2.v4), ("", "fd00:99::1", "eth0", types_pb2.v6),
                    ("fd00:99::/64", "", "eth0", types_pb2.v6)} <= routes, routes

            deadline = time.monotonic() + 30
            out = ping(ns, "10.99.0.5", deadline)
            assert out.returncode == 0, out.stdout + out.stderr
            out = ping(ns, "fd00:99::5", deadline)
            assert out.returncode == 0, out.stdout + out.stderr
            # the guest answered from the static neighbour's MAC, learnt by the netns via ARP/NDP
            neigh = ns_run(ns, "ip", "neigh", "show", "dev", "tap0").stdout
            assert GUEST_MAC in neigh, neigh
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
