"""One CPU sample of the node: usage (in cores) of the node, the online tier, the offline tier
and the rest ("system"), measured over the interval since the previous sample from cumulative
nanosecond counters (the root cgroup and each tier's groups), plus the offline tier's current
limits. The counters are cgroup files; :class:`CpuSampler` keeps the previous reading.

node usage = the node group's CPU time (the hierarchy root: every task on the host; or the
``[daemon] node_cgroup`` subtree the daemon is given); node CPUs = that group's CPUs; system =
node − online − offline (clamped at 0): host daemons, the shim when not in a tier, kernel threads.
Per-CPU online usage comes from cpuacct.usage_percpu on v1 (None on v2).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from common.errors import ResourceError
from resourced import tiers as tiermod
from shim.resources.qos import cgroupfs
from shim.resources.qos.driver import CgroupDriver
from shim.resources.qos.model import parse_cpuset


@dataclass(frozen=True)
class CpuSample:
    """Usage in cores over ``interval_s``; limits as currently written on the offline tier."""

    interval_s: float
    node_cpus: tuple[int, ...]
    node_used: float
    online_used: float
    offline_used: float
    offline_cpus: tuple[int, ...]
    offline_quota_cores: float | None
    offline_vcpus: int
    online_per_cpu: dict[int, float] | None = None
    online_groups: tuple[str, ...] = ()
    offline_groups: tuple[str, ...] = ()

    @property
    def system_used(self) -> float:
        return max(0.0, self.node_used - self.online_used - self.offline_used)

    @property
    def offline_limit_cores(self) -> float:
        """What the offline tier may use now: its cpuset size, capped by its quota."""
        cores = float(len(self.offline_cpus) or len(self.node_cpus))
        return min(cores, self.offline_quota_cores) if self.offline_quota_cores is not None else cores


@dataclass
class _Reading:
    t: float
    node: int
    online: dict[str, int]
    offline: dict[str, int]
    online_percpu: dict[str, list[int]]


@dataclass
class CpuSampler:
    driver: CgroupDriver
    tiers: tiermod.Tiers
    node: str = ""
    _prev: _Reading | None = None
    _groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """The mount that accounts CPU time (v1 cpuacct, v2 unified)."""
        d = self.driver
        return d.mountpoints["cpuacct"] if d.version == 1 else d.mountpoint  # type: ignore[attr-defined]

    @property
    def cpuset_base(self) -> str | None:
        d = self.driver
        return d.mountpoints.get("cpuset") if d.version == 1 else d.mountpoint  # type: ignore[attr-defined]

    def groups(self) -> tuple[list[str], list[str]]:
        online = tiermod.expand(self.base, self.tiers.online)
        offline = [g for g in tiermod.expand(self.base, self.tiers.offline) if g not in online]
        return online, offline

    def _usage(self, groups: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in groups:
            try:
                out[g] = self.driver.cpu_usage_ns(g)
            except ResourceError:
                continue  # the group vanished between listing and reading
        return out

    def _percpu(self, groups: list[str]) -> dict[str, list[int]]:
        if self.driver.version != 1:
            return {}
        out: dict[str, list[int]] = {}
        for g in groups:
            try:
                text = cgroupfs.read_value(os.path.join(self.base, g, "cpuacct.usage_percpu"))
                out[g] = [int(x) for x in text.split()]
            except (ResourceError, ValueError):
                continue
        return out

    def node_cpus(self) -> tuple[int, ...]:
        return self.driver.effective_cpus(self.node) if self.node else cgroupfs.online_cpus()

    def offline_cpus(self, offline: list[str]) -> tuple[int, ...]:
        base = self.cpuset_base
        if not offline or base is None:
            return ()
        name = "cpuset.cpus" if self.driver.version == 1 else "cpuset.cpus.effective"
        try:
            text = cgroupfs.read_value(os.path.join(base, offline[0], name))
        except ResourceError:
            return ()
        return parse_cpuset(text) if text else ()

    def offline_quota(self, offline: list[str]) -> float | None:
        if not offline:
            return None
        try:
            if self.driver.version == 1:
                quota = int(self.driver.read(offline[0], "cpu.cfs_quota_us"))
                period = int(self.driver.read(offline[0], "cpu.cfs_period_us"))
            else:
                q, p = self.driver.read(offline[0], "cpu.max").split()
                if q == "max":
                    return None
                quota, period = int(q), int(p)
        except (ResourceError, ValueError):
            return None
        return None if quota <= 0 else quota / period

    def offline_vcpus(self, offline: list[str]) -> int:
        base = self.driver.mountpoints["cpu"] if self.driver.version == 1 else self.base  # type: ignore[attr-defined]
        name = "tasks" if self.driver.version == 1 else "cgroup.threads"
        return sum(len(cgroupfs.read_ints(os.path.join(base, g, name))) for g in tiermod.vcpu_groups(base, offline))

    def sample(self, now: float | None = None) -> CpuSample | None:
        """A sample over the time since the previous call (None on the first call)."""
        now = time.monotonic() if now is None else now
        online, offline = self.groups()
        reading = _Reading(now, self.driver.cpu_usage_ns(self.node), self._usage(online), self._usage(offline),
                           self._percpu(online))
        prev, self._prev = self._prev, reading
        if prev is None or reading.t <= prev.t:
            return None
        dt = reading.t - prev.t

        def rate(a: int, b: int) -> float:
            return max(0, a - b) / 1e9 / dt

        def tier_rate(cur: dict[str, int], old: dict[str, int]) -> float:
            # only groups present in both readings: a group that just appeared brings its whole
            # history with it, one that vanished took its usage along
            return sum(rate(v, old[g]) for g, v in cur.items() if g in old)

        percpu: dict[int, float] | None = None
        if self.driver.version == 1:
            percpu = {}
            for g, values in reading.online_percpu.items():
                before = prev.online_percpu.get(g)
                if before is None or len(before) != len(values):
                    continue
                for cpu, (a, b) in enumerate(zip(values, before)):
                    percpu[cpu] = percpu.get(cpu, 0.0) + rate(a, b)
        return CpuSample(
            interval_s=dt, node_cpus=self.node_cpus(), node_used=rate(reading.node, prev.node),
            online_used=tier_rate(reading.online, prev.online),
            offline_used=tier_rate(reading.offline, prev.offline),
            offline_cpus=self.offline_cpus(offline), offline_quota_cores=self.offline_quota(offline),
            offline_vcpus=self.offline_vcpus(offline), online_per_cpu=percpu,
            online_groups=tuple(online), offline_groups=tuple(offline))


def online_limits(driver: CgroupDriver, base: str, online: list[str], depth: int = 3) -> dict[str, tuple[int, int]]:
    """group → (quota_us, period_us) for every group at most ``depth`` levels into the online
    tier that has a CFS quota (the burst policy's input)."""
    out: dict[str, tuple[int, int]] = {}
    for root in online:
        for g in tiermod.walk(base, root, depth):
            try:
                if driver.version == 1:
                    quota, period = int(driver.read(g, "cpu.cfs_quota_us")), int(driver.read(g, "cpu.cfs_period_us"))
                else:
                    q, p = driver.read(g, "cpu.max").split()
                    quota, period = (-1 if q == "max" else int(q)), int(p)
            except (ResourceError, ValueError):
                continue
            if quota > 0:
                out[g] = (quota, period)
    return out
