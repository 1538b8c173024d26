"""Per-pod tc-filter setup + teardown: Cython raw netlink vs pyroute2 vs `ip`/`tc` commands.

One fresh netns pair (kc-bench-<rand>-pod with a CNI-like eth0, kc-bench-<rand>-peer), the
three methods interleaved round by round so machine noise hits them alike, N rounds each
(KC_BENCH_NETWORK_N, default 40). setup = tap + mtu/up + 2 ingress qdiscs + 2 mirred filters;
teardown = the reverse. The ip/tc baseline creates the tap with `ip tuntap` (no fds are
handed over; the VMM would have to reopen it by name). Needs root; otherwise says so and
returns.
"""
from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

MTU = 1400
TAP = "tap0_kata"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _make_netns(tag: str) -> tuple[str, str]:
    pod, peer = f"{tag}-pod", f"{tag}-peer"
    _run("ip", "netns", "add", pod)
    _run("ip", "netns", "add", peer)
    _run("ip", "-n", pod, "link", "add", "eth0", "mtu", str(MTU), "type", "veth",
         "peer", "name", "peer0", "netns", peer)
    _run("ip", "-n", pod, "addr", "add", "10.232.0.2/24", "dev", "eth0")
    _run("ip", "-n", pod, "link", "set", "eth0", "up")
    _run("ip", "-n", peer, "link", "set", "peer0", "up")
    return pod, peer


def _ip_tc_cycle(ns: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    _run("ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
    _run("ip", "-n", ns, "link", "set", TAP, "mtu", str(MTU), "up")
    _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "ingress")
    _run("tc", "-n", ns, "qdisc", "add", "dev", TAP, "ingress")
    for src, dst in (("eth0", TAP), (TAP, "eth0")):
        _run("tc", "-n", ns, "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all",
             "prio", "1", "u32", "match", "u32", "0", "0", "action", "mirred", "egress",
             "redirect", "dev", dst)
    t1 = time.perf_counter()
    for dev in ("eth0", TAP):
        _run("tc", "-n", ns, "filter", "del", "dev", dev, "parent", "ffff:", "protocol", "all",
             "prio", "1")
    for dev in ("eth0", TAP):
        _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "ingress")
    _run("ip", "-n", ns, "link", "del", TAP)
    return t1 - t0, time.perf_counter() - t1


def _model_cycle(backend: str) -> Callable[[str], tuple[float, float]]:
    from shim.resources.network import TcFilterNetwork, scan_netns

    def cycle(ns: str) -> tuple[float, float]:
        path = f"/var/run/netns/{ns}"
        endpoint = scan_netns(path)[0]          # not timed: the shim scans once per pod anyway
        t0 = time.perf_counter()
        net = TcFilterNetwork(path, backend=backend)  # type: ignore[arg-type]
        att = net.attach(endpoint)
        t1 = time.perf_counter()
        att.close_fds()
        net.detach()
        return t1 - t0, time.perf_counter() - t1

    return cycle


def _fmt(xs: list[float]) -> str:
    return f"mean {statistics.fmean(xs) * 1e3:8.3f} ms  median {statistics.median(xs) * 1e3:8.3f} ms"


def main() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        print("bench_network: needs root and iproute2; skipped")
        return
    from shim.resources.network.tc_fast import load_speedups

    rounds = int(os.environ.get("KC_BENCH_NETWORK_N", "40"))
    methods: dict[str, Callable[[str], tuple[float, float]]] = {}
    if load_speedups() is not None:
        methods["cython"] = _model_cycle("cython")
    else:
        print("bench_network: Cython extension not built; cython column missing")
    methods["pyroute2"] = _model_cycle("pyroute2")
    methods["ip/tc"] = _ip_tc_cycle
    setup: dict[str, list[float]] = {m: [] for m in methods}
    teardown: dict[str, list[float]] = {m: [] for m in methods}
    pod, peer = _make_netns(f"kc-bench-{secrets.token_hex(3)}")
    try:
        for fn in methods.values():              # warm-up (module loads, caches)
            fn(pod)
        for _ in range(rounds):
            for name, fn in methods.items():
                s, t = fn(pod)
                setup[name].append(s)
                teardown[name].append(t)
    finally:
        for ns in (pod, peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    print(f"per-pod tc-filter, {rounds} rounds each, same netns, interleaved")
    base = "cython" if "cython" in methods else "pyroute2"
    phases = {"setup": setup, "teardown": teardown,
              "total": {m: [a + b for a, b in zip(setup[m], teardown[m])] for m in methods}}
    for phase, samples in phases.items():
        ref = statistics.fmean(samples[base])
        for name in methods:
            ratio = statistics.fmean(samples[name]) / ref
            print(f"  {phase:8s} {name:9s} {_fmt(samples[name])}   x{ratio:5.1f} vs {base}")
    print("  (teardown is dominated by the kernel's unregister_netdevice of the tap, the same "
          "for every method)")
