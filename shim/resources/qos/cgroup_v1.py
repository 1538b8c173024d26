"""cgroup v1 driver: the cpu, cpuacct and cpuset hierarchies (co-mounted or not).

Directory management goes through cgroupspy's Node tree (mkdir/rmdir); knob and tasks writes are
plain single write() calls with errors mapped to ResourceError. cpuset groups get cpuset.cpus and
cpuset.mems copied from the parent right after mkdir — a v1 cpuset group with empty cpus/mems
refuses tasks.
"""
from __future__ import annotations

import errno
import os
import posixpath

from cgroupspy.nodes import Node

from common.errors import ResourceError
from shim.resources.qos import cgroupfs
from shim.resources.qos.driver import CgroupDriver, Location, parent_of
from shim.resources.qos.model import CpuKnobs, parse_cpuset

CONTROLLERS = ("cpu", "cpuacct", "cpuset")


class V1Driver(CgroupDriver):
    version = 1

    def __init__(self, mountpoints: dict[str, str] | None = None) -> None:
        if mountpoints is None:
            mountpoints = cgroupfs.v1_mountpoints(cgroupfs.cgroup_mounts())
        missing = [c for c in ("cpu", "cpuacct") if c not in mountpoints]
        if missing:
            raise ResourceError(f"cgroup v1 controller(s) {missing} are not mounted")
        self.mountpoints = dict(mountpoints)
        # One entry per hierarchy (cpu and cpuacct are often co-mounted as cpu,cpuacct).
        self.hierarchies: list[str] = list(dict.fromkeys(self.mountpoints[c] for c in CONTROLLERS
                                                          if c in self.mountpoints))
        self._roots = {mp: Node(posixpath.basename(mp).encode(),
                                parent=Node(posixpath.dirname(mp).encode())) for mp in self.hierarchies}

    # -- paths -------------------------------------------------------------------------------
    def _node(self, mount: str, rel: str) -> Node:
        node = self._roots[mount]
        for part in [p for p in rel.split("/") if p]:
            node = Node(part.encode(), parent=node)
        return node

    def _path(self, mount: str, rel: str, filename: str = "") -> str:
        return os.path.join(mount, rel.strip("/"), filename) if filename else os.path.join(mount, rel.strip("/"))

    def _mount_for_file(self, filename: str) -> str:
        ctrl = filename.split(".", 1)[0]
        if ctrl not in self.mountpoints:
            raise ResourceError(f"cgroup v1 controller {ctrl!r} is not mounted (needed for {filename})")
        return self.mountpoints[ctrl]

    # -- groups ------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return all(os.path.isdir(self._path(mp, rel)) for mp in self.hierarchies)

    def _exists_anywhere(self, rel: str) -> bool:
        return any(os.path.isdir(self._path(mp, rel)) for mp in self.hierarchies)

    def create(self, rel: str, threaded: bool = False) -> bool:
        created = False
        name = posixpath.basename(rel.strip("/"))
        for mp in self.hierarchies:
            if os.path.isdir(self._path(mp, rel)):
                continue
            parent = self._node(mp, parent_of(rel))
            try:
                parent.create_cgroup(name)
            except OSError as exc:
                raise ResourceError(f"cannot create cgroup {self._path(mp, rel)}: {exc.strerror}") from None
            created = True
            if mp == self.mountpoints.get("cpuset"):
                self._inherit_cpuset(rel)
        return created

    def _inherit_cpuset(self, rel: str) -> None:
        mp = self.mountpoints["cpuset"]
        parent = parent_of(rel)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if not cgroupfs.read_value(self._path(mp, rel, knob)):
                cgroupfs.write_value(self._path(mp, rel, knob), cgroupfs.read_value(self._path(mp, parent, knob)))

    def children(self, rel: str) -> list[str]:
        names: set[str] = set()
        for mp in self.hierarchies:
            base = self._path(mp, rel)
            try:
                names.update(e.name for e in os.scandir(base) if e.is_dir())
            except FileNotFoundError:
                continue
        return [posixpath.join(rel, n) if rel else n for n in sorted(names)]

    def remove(self, rel: str) -> bool:
        removed = False
        name = posixpath.basename(rel.strip("/"))
        for mp in reversed(self.hierarchies):
            if not os.path.isdir(self._path(mp, rel)):
                continue
            try:
                self._node(mp, parent_of(rel)).delete_cgroup(name)
            except OSError as exc:
                raise ResourceError(f"cannot remove cgroup {self._path(mp, rel)}: {exc.strerror}") from None
            removed = True
        return removed

    # -- knobs -------------------------------------------------------------------------------
    def set_knobs(self, rel: str, knobs: CpuKnobs) -> None:
        cpu = self.mountpoints["cpu"]

        def path(filename: str) -> str:
            return self._path(cpu, rel, filename)

        def put(filename: str, value: int | str) -> None:
            cgroupfs.write_value(path(filename), value)

        idle_file = os.path.exists(path("cpu.idle"))
        if knobs.cpu_idle is not None and not idle_file:
            raise ResourceError("cpu.idle is not supported by this kernel (needs Linux 5.15+)")
        if knobs.cpu_idle is False:
            put("cpu.idle", 0)  # shares cannot be written while the group is idle
        already_idle = knobs.cpu_idle is True and cgroupfs.read_value(path("cpu.idle")) == "1"
        if knobs.shares is not None and not already_idle:  # an idle group refuses shares (EINVAL)
            put("cpu.shares", knobs.shares)
        if knobs.touches_bandwidth:
            has_burst = os.path.exists(path("cpu.cfs_burst_us"))
            if knobs.burst and not has_burst:
                raise ResourceError("cpu.cfs_burst_us is not supported by this kernel (needs Linux 5.14+)")
            quota = (knobs.cfs_quota_us if knobs.cfs_quota_us is not None
                     else int(cgroupfs.read_value(path("cpu.cfs_quota_us"))))
            burst = knobs.burst
            if burst is None and has_burst:
                burst = int(cgroupfs.read_value(path("cpu.cfs_burst_us")))
                burst = min(burst, quota) if quota > 0 else burst
            # burst ≤ quota and child ≤ parent are checked on each write: open up, then narrow.
            if has_burst:
                put("cpu.cfs_burst_us", 0)
            put("cpu.cfs_quota_us", -1)
            if knobs.cfs_period_us is not None:
                put("cpu.cfs_period_us", knobs.cfs_period_us)
            put("cpu.cfs_quota_us", quota)
            if has_burst and burst:
                put("cpu.cfs_burst_us", burst)
        if knobs.cpu_idle is True:
            put("cpu.idle", 1)
        if knobs.cpuset is not None:
            if "cpuset" not in self.mountpoints:
                raise ResourceError("cgroup v1 cpuset controller is not mounted (a cpuset is configured)")
            cgroupfs.write_value(self._path(self.mountpoints["cpuset"], rel, "cpuset.cpus"), knobs.cpuset)

    # -- threads -----------------------------------------------------------------------------
    def attach_files(self, rel: str) -> tuple[str, ...]:
        return tuple(self._path(mp, rel, "tasks") for mp in self.hierarchies)

    def adopt_process(self, rel: str, pid: int) -> None:
        return None

    def process_location(self, pid: int) -> Location:
        groups = cgroupfs.thread_cgroups(pid)
        loc: Location = {}
        for mp in self.hierarchies:
            ctrls = {c for c, m in self.mountpoints.items() if m == mp}
            for key, path in groups.items():
                if ctrls & set(key.split(",")):
                    loc[mp] = path.strip("/")
        return loc

    def restore_process(self, pid: int, location: Location) -> bool:
        ok = True
        for mp, rel in location.items():
            err = cgroupfs.try_write(self._path(mp, rel, "cgroup.procs"), pid)
            if err in (errno.ESRCH, errno.ENOENT):
                ok = False
            elif err:
                raise ResourceError(f"cannot move process {pid} back to {self._path(mp, rel)}: "
                                    f"{os.strerror(err)}")
        return ok

    def threads(self, rel: str) -> list[int]:
        tids: set[int] = set()
        for mp in self.hierarchies:
            tids.update(cgroupfs.read_ints(self._path(mp, rel, "tasks")))
        return sorted(tids)

    def evacuate(self, rel: str, to_rel: str) -> None:
        for mp in self.hierarchies:
            target = self._path(mp, to_rel, "tasks")
            for tid in cgroupfs.read_ints(self._path(mp, rel, "tasks")):
                err = cgroupfs.try_write(target, tid)
                if err and err != errno.ESRCH:
                    raise ResourceError(f"cannot move thread {tid} to {target}: {os.strerror(err)}")

    def group_of(self, tid: int, controller: str = "cpu") -> str:
        for key, path in cgroupfs.thread_cgroups(tid).items():
            if controller in key.split(","):
                return path.strip("/")
        raise ResourceError(f"thread {tid} is in no {controller} cgroup")

    # -- reading -----------------------------------------------------------------------------
    def read(self, rel: str, filename: str) -> str:
        return cgroupfs.read_value(self._path(self._mount_for_file(filename), rel, filename))

    def cpu_usage_ns(self, rel: str) -> int:
        return int(self.read(rel, "cpuacct.usage"))

    def effective_cpus(self, rel: str) -> tuple[int, ...]:
        if "cpuset" not in self.mountpoints:
            return cgroupfs.online_cpus()
        text = self.read(rel, "cpuset.effective_cpus") if os.path.exists(
            self._path(self.mountpoints["cpuset"], rel, "cpuset.effective_cpus")) else self.read(rel, "cpuset.cpus")
        return parse_cpuset(text) if text else cgroupfs.online_cpus()
