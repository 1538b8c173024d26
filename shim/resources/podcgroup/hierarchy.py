"""The sandbox (pod) cgroup in every hierarchy the VM is accounted in.

cgroup v1: one directory per controller hierarchy in :data:`V1_CONTROLLERS` that is mounted
(cpu, cpuacct, cpuset, memory, pids, blkio; co-mounted ones count once). cgroup v2: the one
unified directory, with the controllers the parent offers enabled in its subtree_control.

:class:`PodHierarchies` does the file work: which path components are missing
(:meth:`missing`, recorded by the caller *before* :meth:`create` makes them), creation (v1 cpuset
groups copy cpus/mems from the parent first, or they refuse tasks), the memory limit, moving a
whole process in and back (cgroup.procs), and removal of what was created, deepest first.
Paths are relative to each hierarchy root ("kata-colo/<id>"); "" is the root.
"""
from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterable, Mapping

from common.errors import ResourceError
from shim.resources.qos import cgroupfs

V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio")
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io")
UNLIMITED_V1 = "-1"


def prefixes(path: str) -> list[str]:
    """"a/b/c" → ["a", "a/b", "a/b/c"]."""
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


class PodHierarchies:
    """``mounts`` maps a hierarchy mountpoint to its controllers (v1) or is one v2 mountpoint."""

    def __init__(self, version: int, mounts: Mapping[str, frozenset[str]]) -> None:
        if not mounts:
            raise ResourceError("no cgroup hierarchy to place the sandbox in")
        self.version = version
        self.mounts = dict(mounts)

    @classmethod
    def detect(cls, version: int | None = None) -> PodHierarchies:
        from shim.resources.qos.detect import detect_version

        version = version or detect_version()
        all_mounts = cgroupfs.cgroup_mounts()
        if version == 2:
            mp = cgroupfs.v2_mountpoint(all_mounts)
            if mp is None:
                raise ResourceError("no cgroup v2 hierarchy is mounted")
            return cls(2, {mp: frozenset(V2_CONTROLLERS)})
        found: dict[str, frozenset[str]] = {}
        for m in all_mounts:
            if m.fstype == "cgroup":
                ctrls = frozenset(m.options & set(V1_CONTROLLERS))
                if ctrls and m.path not in found:
                    found[m.path] = ctrls
        return cls(1, found)

    # -- paths -------------------------------------------------------------------------------
    def dir(self, mount: str, rel: str) -> str:
        return os.path.join(mount, rel.strip("/")) if rel else mount

    def mount_of(self, controller: str) -> str | None:
        return next((mp for mp, ctrls in self.mounts.items() if controller in ctrls), None)

    def missing(self, path: str) -> dict[str, list[str]]:
        """mountpoint → the prefixes of ``path`` that do not exist there yet (shallowest first)."""
        return {mp: [p for p in prefixes(path) if not os.path.isdir(self.dir(mp, p))] for mp in self.mounts}

    def exists(self, path: str) -> bool:
        return all(os.path.isdir(self.dir(mp, path)) for mp in self.mounts)

    # -- creation ----------------------------------------------------------------------------
    def create(self, path: str) -> None:
        """Create every missing component of ``path`` in every hierarchy."""
        for mp in self.mounts:
            for rel in prefixes(path):
                d = self.dir(mp, rel)
                if os.path.isdir(d):
                    continue
                if self.version == 2:
                    self._enable_controllers(mp, posixpath.dirname(rel))
                try:
                    os.mkdir(d)
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise ResourceError(f"cannot create cgroup {d}: {exc.strerror}") from None
                if self.version == 1 and "cpuset" in self.mounts[mp]:
                    self._inherit_cpuset(mp, rel)

    def _inherit_cpuset(self, mp: str, rel: str) -> None:
        parent = posixpath.dirname(rel)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            own = os.path.join(self.dir(mp, rel), knob)
            if not cgroupfs.read_value(own):
                cgroupfs.write_value(own, cgroupfs.read_value(os.path.join(self.dir(mp, parent), knob)))

    def _enable_controllers(self, mp: str, rel: str) -> None:
        d = self.dir(mp, rel)
        have = set(cgroupfs.read_value(os.path.join(d, "cgroup.controllers")).split())
        on = set(cgroupfs.read_value(os.path.join(d, "cgroup.subtree_control")).split())
        want = [c for c in V2_CONTROLLERS if c in have and c not in on]
        if want:
            cgroupfs.write_value(os.path.join(d, "cgroup.subtree_control"), " ".join(f"+{c}" for c in want))

    # -- knobs -------------------------------------------------------------------------------
    def set_memory_limit(self, path: str, limit: int | None) -> None:
        """memory.limit_in_bytes (v1) / memory.max (v2); None = unlimited."""
        if self.version == 2:
            mp = next(iter(self.mounts))
            f = os.path.join(self.dir(mp, path), "memory.max")
            if not os.path.exists(f):
                if limit is None:
                    return
                raise ResourceError(f"the memory controller is not enabled for {self.dir(mp, path)}")
            cgroupfs.write_value(f, "max" if limit is None else limit)
            return
        mp_mem = self.mount_of("memory")
        if mp_mem is None:
            if limit is None:
                return
            raise ResourceError("the cgroup v1 memory controller is not mounted; cannot limit the sandbox")
        cgroupfs.write_value(os.path.join(self.dir(mp_mem, path), "memory.limit_in_bytes"),
                             UNLIMITED_V1 if limit is None else limit)

    def memory_limit(self, path: str) -> int | None:
        if self.version == 2:
            mp = next(iter(self.mounts))
            text = cgroupfs.read_value(os.path.join(self.dir(mp, path), "memory.max"))
            return None if text == "max" else int(text)
        mp_mem = self.mount_of("memory")
        if mp_mem is None:
            return None
        value = int(cgroupfs.read_value(os.path.join(self.dir(mp_mem, path), "memory.limit_in_bytes")))
        return None if value >= (1 << 62) else value

    # -- processes ---------------------------------------------------------------------------
    def location(self, pid: int) -> dict[str, str]:
        """mountpoint → the process's group there (relative)."""
        groups = cgroupfs.thread_cgroups(pid)
        out: dict[str, str] = {}
        for mp, ctrls in self.mounts.items():
            for key, path in groups.items():
                if (self.version == 2 and key == "") or (self.version == 1 and ctrls & set(key.split(","))):
                    out[mp] = path.strip("/")
        return out

    def join(self, path: str, pid: int) -> None:
        """Move the whole process (every thread) into ``path`` in every hierarchy."""
        for mp in self.mounts:
            cgroupfs.write_value(os.path.join(self.dir(mp, path), "cgroup.procs"), pid)

    def move_back(self, pid: int, origin: Mapping[str, str]) -> None:
        """Move ``pid`` to its recorded groups (the hierarchy root where one is gone)."""
        for mp in self.mounts:
            target = origin.get(mp, "")
            if not os.path.isdir(self.dir(mp, target)):
                target = ""
            err = cgroupfs.try_write(os.path.join(self.dir(mp, target), "cgroup.procs"), pid)
            if err and err != errno.ESRCH:
                raise ResourceError(f"cannot move process {pid} back to {self.dir(mp, target)}: {os.strerror(err)}")

    def procs(self, mp: str, rel: str) -> list[int]:
        return cgroupfs.read_ints(os.path.join(self.dir(mp, rel), "cgroup.procs"))

    # -- removal -----------------------------------------------------------------------------
    def remove(self, created: Mapping[str, Iterable[str]], evacuate: str = "") -> list[str]:
        """rmdir the recorded groups, deepest first, in each hierarchy. ``evacuate`` (a group
        path, normally the sandbox group) is emptied into the hierarchy root first if a process
        is still inside (recovery after a crash); any other busy group (a shared parent another
        sandbox still uses) is left alone. Returns the removed directories."""
        removed: list[str] = []
        for mp, rels in created.items():
            if mp not in self.mounts:
                continue
            for rel in sorted(set(rels), key=lambda r: r.count("/"), reverse=True):
                d = self.dir(mp, rel)
                if not os.path.isdir(d):
                    continue
                if evacuate and rel == evacuate:
                    removed.extend(self._clear_subtree(mp, rel))
                try:
                    os.rmdir(d)
                    removed.append(d)
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                        raise ResourceError(f"cannot remove cgroup {d}: {exc.strerror}") from None
                    if rel == evacuate:
                        raise ResourceError(f"cannot remove cgroup {d}: {exc.strerror}") from None
        return removed

    def _clear_subtree(self, mp: str, rel: str) -> list[str]:
        """Empty ``rel`` and remove every group below it (all of it is the sandbox's: leftovers
        of a crash), moving processes still inside to the hierarchy root."""
        removed: list[str] = []
        d = self.dir(mp, rel)
        try:
            children = sorted(e.name for e in os.scandir(d) if e.is_dir())
        except FileNotFoundError:
            return removed
        for name in children:
            child = posixpath.join(rel, name)
            removed.extend(self._clear_subtree(mp, child))
            try:
                os.rmdir(self.dir(mp, child))
                removed.append(self.dir(mp, child))
            except OSError as exc:
                raise ResourceError(f"cannot remove cgroup {self.dir(mp, child)}: {exc.strerror}") from None
        self._evacuate(mp, rel)
        return removed

    def _evacuate(self, mp: str, rel: str) -> None:
        root_procs = os.path.join(mp, "cgroup.procs")
        for pid in self.procs(mp, rel):
            err = cgroupfs.try_write(root_procs, pid)
            if err and err != errno.ESRCH:
                raise ResourceError(f"cannot move process {pid} out of {self.dir(mp, rel)}: {os.strerror(err)}")
