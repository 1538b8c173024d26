"""Place + pin the 64 threads of one process into priority cgroups: the Cython hot path
(shim._speedups.pinning) against the pure-Python one (shim.resources.qos.placement), same run.

Needs root (cgroups). Each round moves all 64 threads between two priority groups (each write
is a real cgroup attach) and sets their affinity; reported times are the best of N rounds.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

from shim.config import ColoConfig
from shim.resources.qos import QosConfig, QosManager, detect_driver, placement

THREADS = 64
ROUNDS = 15
SLEEPER = """
import sys, threading, time
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""


def _best(placer: placement.Placer, ops_a: list, ops_b: list) -> float:
    best = float("inf")
    for i in range(ROUNDS):
        ops = ops_a if i % 2 == 0 else ops_b
        t0 = time.perf_counter()
        failures = placer(ops)
        best = min(best, time.perf_counter() - t0)
        assert not failures, failures[:3]
    return best


def main() -> None:
    if os.geteuid() != 0:
        print("bench_qos: needs root (cgroups); skipped")
        return
    placers = placement.available_placers()
    if "cython" not in placers:
        print("bench_qos: shim._speedups.pinning is not built (python3 setup.py build_ext --inplace)")
    root = f"kata-colo-bench-{secrets.token_hex(4)}"
    cpus = sorted(os.sched_getaffinity(0))
    cfg = QosConfig.from_colo(ColoConfig(cgroup_root=root, root={}, priorities={
        "high": {"cpu_shares": 1024, "pin": True}, "low": {"cpu_shares": 2, "pin": True}}))
    driver = detect_driver()
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, str(THREADS + 1)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        while len(os.listdir(f"/proc/{proc.pid}/task")) < THREADS + 1:
            time.sleep(0.01)
        tids = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))[1:THREADS + 1]
        mgr = QosManager("bench", cfg, driver=driver)
        # 64 vCPUs: 32 high + 32 low; the manager creates the groups and does the first placement.
        mgr.place(dict(enumerate(tids)), proc.pid, ["high"] * (THREADS // 2) + ["low"] * (THREADS // 2))
        try:
            files = {p: driver.attach_files(mgr.priority_group(p)) for p in ("high", "low")}
            ops_a = [(t, files["high" if i % 2 else "low"], (cpus[i % len(cpus)],)) for i, t in enumerate(tids)]
            ops_b = [(t, files["low" if i % 2 else "high"], (cpus[(i + 1) % len(cpus)],)) for i, t in enumerate(tids)]
            results = {name: _best(fn, ops_a, ops_b) for name, fn in placers.items()}
            # and once more in the other order, to even out warm-up effects
            results = {name: min(results[name], _best(fn, ops_a, ops_b)) for name, fn in reversed(placers.items())}
            t0 = time.perf_counter()
            mgr.rebalance(dict(enumerate(tids)))
            full = time.perf_counter() - t0
        finally:
            mgr.cleanup()
    finally:
        proc.kill()
        proc.wait()
    for name, secs in results.items():
        print(f"place+pin {THREADS} threads (cgroup v{driver.version}) "
              f"{name:>6}: {secs * 1e3:8.3f} ms  ({secs / THREADS * 1e6:.1f} us/thread)")
    if "cython" in results:
        print(f"speedup cython vs python: {results['python'] / results['cython']:.2f}x")
    print(f"QosManager.rebalance of {THREADS} vCPUs (with the best placer): {full * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
