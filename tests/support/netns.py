"""Network namespaces for tests (root): run commands, build a CNI-like pod netns, snapshot it.

``cni_netns(name, ...)`` leaves what a CNI bridge plugin leaves: ``eth0`` (a veth) with MAC,
MTU, an address and a default route; the veth's peer lives in ``peer_netns`` (a second test
namespace) or, with ``host_if``, in the host namespace with the gateway address. Everything it
made is deleted on exit (deleting a namespace deletes its links).
"""
from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> str:
    """Run ``argv``; stdout. AssertionError with stderr when it fails and ``check``."""
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} → {res.returncode}: {res.stderr}")
    return res.stdout


def ip(*args: str, check: bool = True) -> str:
    return sh("ip", *args, check=check)


def ns_run(ns: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``ip netns exec ns argv`` (CompletedProcess; CalledProcessError when it fails and ``check``)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout,
                          check=check)


def ns_sh(ns: str, *argv: str, check: bool = True) -> str:
    """stdout of ``argv`` run in ``ns`` (AssertionError with stderr when it fails and ``check``)."""
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def unique_name(prefix: str = "kc-test") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def netns_path(ns: str) -> str:
    return str(NETNS_DIR / ns)


def delete_netns(*names: str) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def snapshot(ns: str) -> str:
    """Links, addresses, routes and qdiscs of ``ns`` (to compare before/after a sandbox)."""
    return "\n".join(ns_sh(ns, *cmd) for cmd in (
        ["ip", "-o", "link", "show"], ["ip", "-o", "addr", "show"], ["ip", "route", "show"],
        ["tc", "qdisc", "show"]))


def links(ns: str) -> list[str]:
    out = ns_sh(ns, "ip", "-o", "link", "show")
    return [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]


def tc_leftovers(ns: str, dev: str = "eth0") -> dict[str, str]:
    """What the tc-filter model adds to a pod netns: an ingress qdisc and filters on ``dev``."""
    return {"ingress qdisc": "\n".join(ln for ln in ns_sh(ns, "tc", "qdisc", "show", "dev", dev).splitlines()
                                       if "ingress" in ln),
            "filters": ns_sh(ns, "tc", "filter", "show", "dev", dev, "ingress").strip()}


def _wait_carrier(ns: str, dev: str, timeout: float = 5.0) -> None:
    """Wait until ``dev`` reports carrier (a fresh veth says NO-CARRIER for a moment, which
    would make a before/after snapshot differ)."""
    deadline = time.monotonic() + timeout
    while "NO-CARRIER" in ns_sh(ns, "ip", "-o", "link", "show", "dev", dev):
        if time.monotonic() > deadline:
            raise AssertionError(f"{ns}/{dev}: no carrier after {timeout}s")
        time.sleep(0.01)


@contextlib.contextmanager
def cni_netns(name: str, *, pod_ip: str = "10.251.9.2", gw_ip: str = "10.251.9.1", prefix: int = 24,
              mtu: int = 1400, mac: str = "", peer_netns: str = "", host_if: str = "") -> Iterator[str]:
    """A pod netns ``name`` as CNI leaves it; yields its path. The veth peer is ``host_if`` in
    the host namespace (with ``gw_ip``), or ``peer0`` in ``peer_netns`` (made and deleted here
    when given), or else stays unconfigured in ``<name>-peer``."""
    peer = "" if host_if else (peer_netns or f"{name}-peer")
    delete_netns(name, *([peer] if peer else []))
    if host_if:
        ip("link", "del", host_if, check=False)
    try:
        ip("netns", "add", name)
        if peer:
            ip("netns", "add", peer)
            ip("-n", name, "link", "add", "eth0", "mtu", str(mtu), *(["address", mac] if mac else []),
               "type", "veth", "peer", "name", "peer0", "netns", peer)
            ip("-n", peer, "link", "set", "peer0", "up")
            ip("-n", peer, "addr", "add", f"{gw_ip}/{prefix}", "dev", "peer0")
        else:
            ip("link", "add", host_if, "mtu", str(mtu), "type", "veth", "peer", "name", f"{host_if}p",
               "mtu", str(mtu), "netns", name)
            ip("-n", name, "link", "set", f"{host_if}p", "name", "eth0")
            if mac:
                ip("-n", name, "link", "set", "eth0", "address", mac)
            ip("addr", "add", f"{gw_ip}/{prefix}", "dev", host_if)
            ip("link", "set", host_if, "up")
        ns_sh(name, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")  # no "tentative" to compare
        ip("-n", name, "addr", "add", f"{pod_ip}/{prefix}", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "route", "add", "default", "via", gw_ip)
        _wait_carrier(name, "eth0")
        yield netns_path(name)
    finally:
        delete_netns(name, *([peer] if peer else []))
        if host_if:
            ip("link", "del", host_if, check=False)
