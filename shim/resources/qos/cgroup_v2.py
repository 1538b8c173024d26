"""cgroup v2 driver (unified hierarchy, plain file I/O).

Per-thread placement uses threaded mode: the sandbox group is a normal domain group that holds
the VMM process (cgroup.procs) and becomes a threaded root; its children vcpu-<priority> and
vmm get ``cgroup.type = threaded`` and receive thread ids through ``cgroup.threads``. Only
threaded controllers (cpu, cpuset) can be enabled below the sandbox, and a thread can leave the
threaded subtree only with its whole process (cgroup.procs of a domain group).
"""
from __future__ import annotations

import errno
import os
import posixpath

from common.errors import ResourceError
from shim.resources.qos import cgroupfs
from shim.resources.qos.driver import CgroupDriver, Location, parent_of
from shim.resources.qos.model import DEFAULT_PERIOD, CpuKnobs, parse_cpuset

THREADED_CONTROLLERS = ("cpu", "cpuset")


def render_knobs(knobs: CpuKnobs, current_max: str = f"max {DEFAULT_PERIOD}") -> list[tuple[str, str]]:
    """The ordered (file, value) writes for ``knobs`` on v2. ``current_max`` is the group's
    cpu.max, used for the half of QUOTA/PERIOD the knobs leave unset."""
    writes: list[tuple[str, str]] = []
    if knobs.cpu_idle is False:
        writes.append(("cpu.idle", "0"))  # cpu.weight is EINVAL while the group is idle
    if knobs.weight is not None:
        writes.append(("cpu.weight", str(knobs.weight)))
    if knobs.touches_bandwidth:
        cur_quota, cur_period = (current_max.split() + [str(DEFAULT_PERIOD)])[:2]
        period = knobs.cfs_period_us if knobs.cfs_period_us is not None else int(cur_period)
        if knobs.cfs_quota_us is not None:
            quota = "max" if knobs.cfs_quota_us == -1 else str(knobs.cfs_quota_us)
        else:
            quota = cur_quota
        burst = knobs.burst or 0
        if quota != "max":
            burst = min(burst, int(quota))
        # burst ≤ quota is checked on every write: drop burst, set the limit, then the burst.
        writes += [("cpu.max.burst", "0"), ("cpu.max", f"{quota} {period}")]
        if burst:
            writes.append(("cpu.max.burst", str(burst)))
    if knobs.cpu_idle is True:
        writes.append(("cpu.idle", "1"))
    if knobs.cpuset is not None:
        writes.append(("cpuset.cpus", knobs.cpuset))
    return writes


class V2Driver(CgroupDriver):
    version = 2

    def __init__(self, mountpoint: str | None = None) -> None:
        if mountpoint is None:
            mountpoint = cgroupfs.v2_mountpoint(cgroupfs.cgroup_mounts())
        if not mountpoint or not os.path.exists(os.path.join(mountpoint, "cgroup.procs")):
            raise ResourceError("no cgroup v2 hierarchy is mounted")
        self.mountpoint = mountpoint

    def _path(self, rel: str, filename: str = "") -> str:
        base = os.path.join(self.mountpoint, rel.strip("/"))
        return os.path.join(base, filename) if filename else base

    def controllers(self, rel: str) -> set[str]:
        return set(cgroupfs.read_value(self._path(rel, "cgroup.controllers")).split())

    def subtree_control(self, rel: str) -> set[str]:
        return set(cgroupfs.read_value(self._path(rel, "cgroup.subtree_control")).split())

    def _enable_for_children(self, rel: str) -> None:
        """+cpu +cpuset in rel's subtree_control for those the group has available."""
        want = [c for c in THREADED_CONTROLLERS if c in self.controllers(rel) and c not in self.subtree_control(rel)]
        if want:
            cgroupfs.write_value(self._path(rel, "cgroup.subtree_control"), " ".join(f"+{c}" for c in want))

    # -- groups ------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return os.path.isdir(self._path(rel))

    def create(self, rel: str, threaded: bool = False) -> bool:
        path = self._path(rel)
        if os.path.isdir(path):
            created = False
        else:
            self._enable_for_children(parent_of(rel))
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ResourceError(f"cannot create cgroup {path}: {exc.strerror}") from None
            created = True
        if threaded and cgroupfs.read_value(self._path(rel, "cgroup.type")) != "threaded":
            cgroupfs.write_value(self._path(rel, "cgroup.type"), "threaded")
        return created

    def group_type(self, rel: str) -> str:
        return cgroupfs.read_value(self._path(rel, "cgroup.type"))

    def children(self, rel: str) -> list[str]:
        try:
            names = sorted(e.name for e in os.scandir(self._path(rel)) if e.is_dir())
        except FileNotFoundError:
            return []
        return [posixpath.join(rel, n) if rel else n for n in names]

    def remove(self, rel: str) -> bool:
        return cgroupfs.remove_dir(self._path(rel))

    # -- knobs -------------------------------------------------------------------------------
    def set_knobs(self, rel: str, knobs: CpuKnobs) -> None:
        writes = render_knobs(knobs, self._current_max(rel))
        idle_file = self._path(rel, "cpu.idle")
        if knobs.cpu_idle is True and os.path.exists(idle_file) and cgroupfs.read_value(idle_file) == "1":
            writes = [w for w in writes if w[0] != "cpu.weight"]  # an idle group refuses a weight
        if not writes:
            return
        available = self.controllers(rel)
        for filename, value in writes:
            ctrl = filename.split(".", 1)[0]
            if ctrl not in available:
                raise ResourceError(f"cgroup v2 controller {ctrl!r} is not enabled for {self._path(rel)} "
                                    f"(available: {sorted(available) or 'none'}); cannot set {filename}")
            path = self._path(rel, filename)
            if filename in ("cpu.max.burst", "cpu.idle") and not os.path.exists(path):
                if value == "0":
                    continue
                raise ResourceError(f"{filename} is not supported by this kernel")
            cgroupfs.write_value(path, value)

    def _current_max(self, rel: str) -> str:
        path = self._path(rel, "cpu.max")
        return cgroupfs.read_value(path) if os.path.exists(path) else f"max {DEFAULT_PERIOD}"

    # -- threads -----------------------------------------------------------------------------
    def attach_files(self, rel: str) -> tuple[str, ...]:
        return (self._path(rel, "cgroup.threads"),)

    def adopt_process(self, rel: str, pid: int) -> None:
        cgroupfs.write_value(self._path(rel, "cgroup.procs"), pid)

    def process_location(self, pid: int) -> Location:
        return {"": cgroupfs.thread_cgroups(pid).get("", "/").strip("/")}

    def restore_process(self, pid: int, location: Location) -> bool:
        err = cgroupfs.try_write(self._path(location.get("", ""), "cgroup.procs"), pid)
        if err in (errno.ESRCH, errno.ENOENT):
            return False
        if err:
            raise ResourceError(f"cannot move process {pid} back to {location}: {os.strerror(err)}")
        return True

    def threads(self, rel: str) -> list[int]:
        return sorted(cgroupfs.read_ints(self._path(rel, "cgroup.threads")))

    def evacuate(self, rel: str, to_rel: str) -> None:
        target = self._path(to_rel, "cgroup.procs")
        pids = {cgroupfs.thread_tgid(t) for t in self.threads(rel)}
        for pid in sorted(p for p in pids if p is not None):
            err = cgroupfs.try_write(target, pid)
            if err and err != errno.ESRCH:
                raise ResourceError(f"cannot move process {pid} to {target}: {os.strerror(err)}")

    def group_of(self, tid: int, controller: str = "") -> str:
        return cgroupfs.thread_cgroups(tid).get("", "/").strip("/")

    # -- reading -----------------------------------------------------------------------------
    def read(self, rel: str, filename: str) -> str:
        return cgroupfs.read_value(self._path(rel, filename))

    def cpu_usage_ns(self, rel: str) -> int:
        for line in self.read(rel, "cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        raise ResourceError(f"no usage_usec in {self._path(rel, 'cpu.stat')}")

    def effective_cpus(self, rel: str) -> tuple[int, ...]:
        path = self._path(rel, "cpuset.cpus.effective")
        if os.path.exists(path):
            text = cgroupfs.read_value(path)
            if text:
                return parse_cpuset(text)
        return cgroupfs.online_cpus()
