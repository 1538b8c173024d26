"""Carry actions out on the cgroup tree (or only describe them: ``dry_run``).

Writes are idempotent: a knob that already holds the value is not written. A cpuset on v1 must
stay within the parent's, so an offline tier's subtree is first widened top-down to the union
of old and new CPUs, then narrowed bottom-up to the new set (every group of the subtree gets the
tier's CPUs: while cpuset suppression runs it owns the offline cpusets). On v2 only the tier
groups are written (children's effective CPUs follow). Every action returns a one-line
description of what was (or would be) done; failures raise ResourceError naming the file.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from common.errors import ResourceError
from resourced import tiers as tiermod
from resourced.policies.base import Action, SetBurst, SetCpuset, SetQuota, WriteKnob
from shim.resources.qos import cgroupfs
from shim.resources.qos.driver import CgroupDriver
from shim.resources.qos.model import CpuKnobs, format_cpuset, parse_cpuset


class Actuator:
    def __init__(self, driver: CgroupDriver, dry_run: bool = False) -> None:
        self.driver = driver
        self.dry_run = dry_run

    def apply(self, action: Action) -> str:
        handlers: dict[type, Callable[[object], str]] = {
            SetCpuset: self._cpuset, SetQuota: self._quota, SetBurst: self._burst, WriteKnob: self._knob}
        handler = handlers.get(type(action))
        if handler is None:
            raise ResourceError(f"the actuator cannot apply {action.kind}")
        return handler(action)

    # -- cpuset --------------------------------------------------------------------------------
    def _cpuset_base(self) -> str:
        d = self.driver
        base = d.mountpoints.get("cpuset") if d.version == 1 else d.mountpoint  # type: ignore[attr-defined]
        if not base:
            raise ResourceError("no cpuset controller is mounted")
        return str(base)

    def _write_cpus(self, path: str, cpus: str) -> bool:
        f = os.path.join(path, "cpuset.cpus")
        if cgroupfs.read_value(f) == cpus:
            return False
        if not self.dry_run:
            cgroupfs.write_value(f, cpus)
        return True

    def _cpuset(self, a: object) -> str:
        assert isinstance(a, SetCpuset)
        base = self._cpuset_base()
        new = format_cpuset(a.cpus)
        changed = 0
        for tier in a.groups:
            groups = tiermod.walk(base, tier) if self.driver.version == 1 else [tier]
            paths = [os.path.join(base, g) for g in groups if os.path.isdir(os.path.join(base, g))]
            if not paths:
                continue
            old_text = cgroupfs.read_value(os.path.join(paths[0], "cpuset.cpus"))
            old = parse_cpuset(old_text) if old_text else ()
            union = format_cpuset(tuple(set(old) | set(a.cpus)))
            for p in paths:            # widen, parents first
                changed += self._write_cpus(p, union)
            for p in reversed(paths):  # narrow, children first
                changed += self._write_cpus(p, new)
        verb = "would set" if self.dry_run else "set"
        return f"{verb} cpuset.cpus={new} on {', '.join(a.groups)} ({changed} writes)"

    # -- quota / burst / knobs ---------------------------------------------------------------
    def _quota(self, a: object) -> str:
        assert isinstance(a, SetQuota)
        for g in a.groups:
            if not self.dry_run:
                self.driver.set_knobs(g, CpuKnobs(cfs_quota_us=a.quota_us, cfs_period_us=a.period_us))
        verb = "would set" if self.dry_run else "set"
        return f"{verb} CFS quota {a.quota_us}/{a.period_us} us on {', '.join(a.groups)}"

    def _burst(self, a: object) -> str:
        assert isinstance(a, SetBurst)
        filename = "cpu.cfs_burst_us" if self.driver.version == 1 else "cpu.max.burst"
        return self._write(a.group, filename, str(a.burst_us))

    def _knob(self, a: object) -> str:
        assert isinstance(a, WriteKnob)
        return self._write(a.group, a.filename, a.value)

    def _write(self, group: str, filename: str, value: str) -> str:
        try:
            if self.driver.read(group, filename) == value:
                return f"{group}/{filename} already {value}"
        except ResourceError:
            pass
        if not self.dry_run:
            path = self._file(group, filename)
            cgroupfs.write_value(path, value)
        return f"{'would write' if self.dry_run else 'wrote'} {group}/{filename}={value}"

    def _file(self, group: str, filename: str) -> str:
        d = self.driver
        if d.version == 1:
            mp = d.mountpoints.get(filename.split(".", 1)[0])  # type: ignore[attr-defined]
            if mp is None:
                raise ResourceError(f"no cgroup v1 hierarchy for {filename}")
            return os.path.join(mp, group, filename)
        return os.path.join(d.mountpoint, group, filename)  # type: ignore[attr-defined]
