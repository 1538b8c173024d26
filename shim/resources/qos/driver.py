"""The cgroup driver interface shared by the v1 and v2 implementations.

Groups are named by paths relative to the hierarchy root without a leading slash
("kata-colo/<sandbox>/vcpu-high"; "" is the hierarchy root). A v1 driver spans the cpu,
cpuacct and cpuset hierarchies (each operation applies to every one of them); a v2 driver
works on the single unified hierarchy.
"""
from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod

from common.errors import ResourceError
from shim.resources.qos.model import CpuKnobs

Location = dict[str, str]


class CgroupDriver(ABC):
    version: int

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """True when the group exists (in every hierarchy the driver uses)."""

    @abstractmethod
    def create(self, rel: str, threaded: bool = False) -> bool:
        """Create one group (its parent must exist); True if anything was created. ``threaded``
        asks for a v2 threaded group (ignored by v1). v1 cpuset groups get cpus/mems copied
        from the parent before any task can be attached."""

    @abstractmethod
    def set_knobs(self, rel: str, knobs: CpuKnobs) -> None:
        """Write the knobs that are set (None = leave alone) in a safe order."""

    @abstractmethod
    def attach_files(self, rel: str) -> tuple[str, ...]:
        """Files a thread id must be written to so that the thread lands in ``rel``."""

    @abstractmethod
    def adopt_process(self, rel: str, pid: int) -> None:
        """Move the whole process into domain group ``rel`` before its threads are spread over
        threaded children (v2); a no-op for v1, where every thread moves by itself."""

    @abstractmethod
    def process_location(self, pid: int) -> Location:
        """Where the process is now (opaque; feed it to :meth:`restore_process`)."""

    @abstractmethod
    def restore_process(self, pid: int, location: Location) -> bool:
        """Move every thread of ``pid`` back to ``location``; False if the process is gone or the
        location no longer exists."""

    @abstractmethod
    def threads(self, rel: str) -> list[int]:
        """Thread ids in the group (any hierarchy)."""

    @abstractmethod
    def children(self, rel: str) -> list[str]:
        """Child group paths."""

    @abstractmethod
    def remove(self, rel: str) -> bool:
        """rmdir the group everywhere; False if it did not exist."""

    @abstractmethod
    def evacuate(self, rel: str, to_rel: str) -> None:
        """Move every thread still in ``rel`` to ``to_rel`` (processes as a whole on v2)."""

    @abstractmethod
    def group_of(self, tid: int) -> str:
        """The group of a thread in the cpu hierarchy (relative, no leading slash)."""

    @abstractmethod
    def read(self, rel: str, filename: str) -> str:
        """Read a knob file of the group (controller picked by the file's prefix on v1)."""

    @abstractmethod
    def cpu_usage_ns(self, rel: str) -> int:
        """CPU time consumed by the group's threads, in nanoseconds."""

    @abstractmethod
    def effective_cpus(self, rel: str) -> tuple[int, ...]:
        """Host CPUs threads in the group may run on."""

    def supports_idle(self, rel: str) -> bool:
        """Whether the kernel offers cpu.idle (upstream since Linux 5.15) for group ``rel``."""
        return kernel_release() >= IDLE_KERNEL

    def remove_tree(self, rel: str, fallback: str) -> list[str]:
        """Remove ``rel`` and every group below it, deepest first, moving threads still inside
        to ``fallback``. Returns the removed paths. Idempotent."""
        removed: list[str] = []
        if not self.exists(rel) and not self._exists_anywhere(rel):
            return removed
        for child in self.children(rel):
            removed.extend(self.remove_tree(child, fallback))
        try:
            if self.remove(rel):
                removed.append(rel)
        except ResourceError:
            self.evacuate(rel, fallback)
            if self.remove(rel):
                removed.append(rel)
        return removed

    def _exists_anywhere(self, rel: str) -> bool:
        return self.exists(rel)


IDLE_KERNEL = (5, 15)


def kernel_release(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel ("6.18.44-fc" → (6, 18))."""
    import platform
    import re

    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parent_of(rel: str) -> str:
    parent = posixpath.dirname(rel.strip("/"))
    return parent
