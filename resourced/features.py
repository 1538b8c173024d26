"""Kernel features the policies may use, detected once at start.

Upstream: ``cpu.idle`` (5.15+), ``cpu.cfs_burst_us`` / ``cpu.max.burst`` (5.14+). Alibaba Cloud
Linux only: group identity (``cpu.bvt_warp_ns``, active when the sysctl
``kernel.sched_group_identity_enabled`` is 1 — the daemon turns it on when the file exists) and
memory watermark grading (``memory.wmark_ratio`` / ``memory.wmark_min_adj``). Probing looks for
the files in a group of the hierarchy (the root lacks some of them on v2), so it needs a group:
the first existing tier group, or a temporary probe group created and removed at once.
"""
from __future__ import annotations

import logging
import os
import secrets

from resourced.policies.base import Features
from shim.resources.qos import cgroupfs
from shim.resources.qos.driver import CgroupDriver

log = logging.getLogger(__name__)
GROUP_IDENTITY_SYSCTL = "/proc/sys/kernel/sched_group_identity_enabled"


def _has(driver: CgroupDriver, rel: str, filename: str) -> bool:
    try:
        driver.read(rel, filename)
        return True
    except Exception:  # noqa: BLE001 - absent or unreadable: the feature is not there
        return False


def detect(driver: CgroupDriver, probe_group: str | None = None) -> Features:
    made = None
    if probe_group is None:
        made = probe_group = f"kata-colo-resourced-probe-{secrets.token_hex(3)}"
        driver.create(made)
    try:
        v = driver.version
        burst_file = "cpu.cfs_burst_us" if v == 1 else "cpu.max.burst"
        identity = _has(driver, probe_group, "cpu.bvt_warp_ns")
        if identity and os.path.exists(GROUP_IDENTITY_SYSCTL):
            try:
                if cgroupfs.read_value(GROUP_IDENTITY_SYSCTL) != "1":
                    cgroupfs.write_value(GROUP_IDENTITY_SYSCTL, 1)
            except Exception as exc:  # noqa: BLE001 - logged; identity is then unusable
                log.warning("group identity: cannot enable %s: %s", GROUP_IDENTITY_SYSCTL, exc)
                identity = False
        wmark = False
        if v == 2:
            wmark = _has(driver, probe_group, "memory.wmark_ratio")
        else:
            mounts = {m.path for m in cgroupfs.cgroup_mounts() if "memory" in m.options}
            wmark = any(os.path.exists(os.path.join(mp, "memory.wmark_ratio")) for mp in mounts)
        return Features(cpu_idle=_has(driver, probe_group, "cpu.idle"), cfs_burst=_has(driver, probe_group, burst_file),
                        group_identity=identity, memory_wmark=wmark, cgroup_version=v)
    finally:
        if made is not None:
            driver.remove(made)
