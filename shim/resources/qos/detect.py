"""Pick the cgroup driver for this host from /proc/self/mounts.

A v1 (or hybrid) host has the cpu controller on a `cgroup` mount; its `cgroup2` mount (often
/sys/fs/cgroup/unified) then carries no cpu controller, so v1 wins. A pure v2 host has only the
`cgroup2` mount.
"""
from __future__ import annotations

from common.errors import ResourceError
from shim.resources.qos import cgroupfs
from shim.resources.qos.cgroup_v1 import V1Driver
from shim.resources.qos.cgroup_v2 import V2Driver
from shim.resources.qos.driver import CgroupDriver


def detect_version(mounts_file: str = cgroupfs.MOUNTS) -> int:
    mounts = cgroupfs.cgroup_mounts(mounts_file)
    if "cpu" in cgroupfs.v1_mountpoints(mounts):
        return 1
    if cgroupfs.v2_mountpoint(mounts):
        return 2
    raise ResourceError("neither a cgroup v1 cpu hierarchy nor a cgroup v2 hierarchy is mounted")


def detect_driver(version: int | None = None) -> CgroupDriver:
    version = version or detect_version()
    return V1Driver() if version == 1 else V2Driver()
