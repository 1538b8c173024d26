"""Pod networking through ctr: a CNI-like netns (veth, IP, MTU, default route) handed to the
kata-colo shim with ``ctr run --with-ns network:<path>``; the VM's NIC is a tap wired to the
veth with tc mirred, and the guest's eth0 gets the veth's MAC, address, MTU and routes."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import IMAGE, RUNTIME
from tests.e2e.test_kata_colo_e2e import assert_nothing_left

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]

NETNS = "kc-e2e-net"
HOST_IF, POD_IF = "kce2e-h", "kce2e-p"
HOST_IP, POD_IP, MTU = "10.251.7.1", "10.251.7.2", 1400
CID = "kc-e2e-net"


def sh(*argv: str, check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} → {res.returncode}: {res.stderr}")
    return res.stdout


def netns_state() -> str:
    """What CNI left in the netns: links, addresses, routes, qdiscs (to compare after teardown)."""
    return "\n".join(sh("ip", "netns", "exec", NETNS, *cmd) for cmd in (
        ["ip", "-o", "link", "show"], ["ip", "-o", "addr", "show"], ["ip", "route", "show"],
        ["tc", "qdisc", "show"]))


@pytest.fixture
def cni_netns():
    sh("ip", "netns", "del", NETNS, check=False)
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "add", NETNS)
    try:
        sh("ip", "link", "add", HOST_IF, "mtu", str(MTU), "type", "veth", "peer", "name", POD_IF,
           "mtu", str(MTU), "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        for cmd in (["ip", "link", "set", POD_IF, "name", "eth0"],
                    ["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"],  # no "tentative" to compare
                    ["ip", "addr", "add", f"{POD_IP}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "default", "via", HOST_IP]):
            sh("ip", "netns", "exec", NETNS, *cmd)
        yield f"/var/run/netns/{NETNS}"
    finally:
        sh("ip", "netns", "del", NETNS, check=False)
        sh("ip", "link", "del", HOST_IF, check=False)


def test_pod_network_via_ctr_with_ns(kata_containerd, cni_netns):
    c = kata_containerd
    before = netns_state()
    pod_mac = sh("ip", "netns", "exec", NETNS, "cat", "/sys/class/net/eth0/address").strip()
    c.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns", f"network:{cni_netns}",
          "--annotation", "io.katacontainers.config.hypervisor.default_vcpus=2", IMAGE, CID,
          "sh", "-c", "mkdir -p /www && echo hello-from-guest > /www/index.html && exec httpd -f -p 8080 -h /www")
    try:
        # host side: a tap with the veth's MTU, and a mirred redirect each way
        tap = sh("ip", "netns", "exec", NETNS, "ip", "-d", "link", "show", "tap0_kata")
        assert f"mtu {MTU}" in tap and "multi_queue" in tap, tap
        assert "mirred" in sh("ip", "netns", "exec", NETNS, "tc", "filter", "show", "dev", "eth0", "ingress")
        assert "mirred" in sh("ip", "netns", "exec", NETNS, "tc", "filter", "show", "dev", "tap0_kata", "ingress")

        # guest side: eth0 has the veth's MAC, address, MTU, default route
        def guest(*argv: str) -> str:
            return c.ctr("task", "exec", "--exec-id", f"x{time.monotonic_ns()}", CID, *argv).stdout.decode()

        addrs = guest("ip", "-o", "addr", "show", "dev", "eth0")
        assert f"{POD_IP}/24" in addrs, addrs
        assert guest("cat", "/sys/class/net/eth0/address").strip() == pod_mac
        assert guest("cat", "/sys/class/net/eth0/mtu").strip() == str(MTU)
        assert f"default via {HOST_IP}" in guest("ip", "route", "show")
        assert "2" == guest("sh", "-c", "ls -d /sys/class/net/eth0/queues/rx-* | wc -l").strip()

        # traffic both ways through veth ↔ tap ↔ virtio-net
        # the host has no iputils ping: busybox-static (a make setup package) has one
        assert "0% packet loss" in sh("busybox", "ping", "-c", "3", "-W", "5", POD_IP)
        body = ""
        for _ in range(30):  # httpd may still be starting
            try:
                body = urllib.request.urlopen(f"http://{POD_IP}:8080/index.html", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body.strip() == "hello-from-guest"
        assert "0% packet loss" in guest("ping", "-c", "2", "-W", "5", HOST_IP)
    finally:
        c.ctr("task", "kill", "-s", "KILL", CID, check=False)
        for _ in range(100):
            if c.ctr("task", "rm", CID, check=False).returncode == 0:
                break
            time.sleep(0.2)
        c.ctr("container", "rm", CID, check=False)
    assert_nothing_left(c, CID)
    # the netns is exactly as CNI left it: no tap, no qdisc, no filter
    assert netns_state() == before
    assert Path(cni_netns).exists()
