"""Pod networking through ctr: a CNI-like netns (veth, IP, MTU, default route) handed to the
kata-colo shim with ``ctr run --with-ns network:<path>``; the VM's NIC is a tap wired to the
veth with tc mirred, and the guest's eth0 gets the veth's MAC, address, MTU and routes."""
from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import netns
from tests.support.containerd import IMAGE, RUNTIME, assert_nothing_left
from tests.support.netns import sh

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]

NETNS = "kc-e2e-net"
HOST_IF = "kce2e-h"
HOST_IP, POD_IP, MTU = "10.251.7.1", "10.251.7.2", 1400
CID = "kc-e2e-net"


@pytest.fixture
def cni_netns():
    with netns.cni_netns(NETNS, host_if=HOST_IF, pod_ip=POD_IP, gw_ip=HOST_IP, mtu=MTU) as path:
        yield path


def test_pod_network_via_ctr_with_ns(kata_containerd, cni_netns):
    c = kata_containerd
    before = netns.snapshot(NETNS)
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
    assert netns.snapshot(NETNS) == before
    assert Path(cni_netns).exists()
