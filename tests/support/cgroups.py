"""Host cgroups for tests: find a group in every hierarchy and sweep a test's groups away.

:func:`hierarchies` lists every mounted cgroup hierarchy (each v1 controller mount and the v2
unified one); :func:`groups_named` finds ``rel`` in any of them, which is how a test proves a
sandbox left no cgroup anywhere (not only where the QoS driver looks).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from shim.resources.qos import QosManager
from shim.resources.qos.driver import CgroupDriver

MOUNTS = "/proc/self/mounts"


def hierarchies(mounts: str = MOUNTS) -> list[str]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy."""
    out = []
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
                out.append(fields[1])
    return out


def groups_named(rel: str) -> list[str]:
    """Every existing ``<hierarchy>/<rel>`` directory."""
    rel = rel.strip("/")
    return [p for p in (os.path.join(h, rel) for h in hierarchies()) if os.path.isdir(p)]


def sweep(driver: CgroupDriver, root: str) -> None:
    """Remove a test's cgroup root and every sandbox group below it (threads still inside go
    back to the hierarchy root), even after a failed test."""
    for sandbox in driver.children(root):
        QosManager.cleanup_sandbox(sandbox.rsplit("/", 1)[-1], root, driver)
    driver.remove_tree(root, "")


SLEEPER = """
import sys, threading, time
n = int(sys.argv[1])
for _ in range(n - 1):
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""


def spawn_sleeper(nthreads: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, str(nthreads)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 5
    while len(os.listdir(f"/proc/{proc.pid}/task")) < nthreads and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def tids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
