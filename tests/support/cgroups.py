"""Host cgroups for tests: find a group in every hierarchy and sweep a test's groups away.

:func:`hierarchies` lists every mounted cgroup hierarchy (each v1 controller mount and the v2
unified one); :func:`groups_named` finds ``rel`` in any of them, which is how a test proves a
sandbox left no cgroup anywhere (not only where the QoS driver looks).
"""
from __future__ import annotations

import os

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
