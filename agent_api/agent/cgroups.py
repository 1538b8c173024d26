"""Reading a container's cgroup: stats (kata's CgroupStats), member pids and the OOM-kill
counter. cgroup v2 (the guest: one unified dir) and v1 (the host in tests: per-controller
dirs) are both read; the container's cgroup path is the one the agent gave runc."""
from __future__ import annotations

import os
from dataclasses import dataclass

from proto.kata import agent_pb2

CGROUP_ROOT = "/sys/fs/cgroup"
USER_HZ = 100
_U64_MAX = (1 << 64) - 1


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _int(path: str, default: int = 0) -> int:
    text = _read(path)
    if text is None:
        return default
    text = text.strip()
    if text == "max":
        return _U64_MAX
    try:
        return int(text)
    except ValueError:
        return default


def _kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


@dataclass(frozen=True)
class Cgroup:
    """A container's cgroup path (relative to the hierarchy root, e.g. /kata-colo/c1)."""

    path: str
    root: str = CGROUP_ROOT

    @property
    def unified(self) -> bool:
        return os.path.exists(os.path.join(self.root, "cgroup.controllers"))

    def dir(self, controller: str = "") -> str:
        rel = self.path.lstrip("/")
        if self.unified:
            return os.path.join(self.root, rel)
        return os.path.join(self.root, controller, rel)

    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self.dir(controller), name)

    def pids(self) -> list[int]:
        ctrl = "" if self.unified else "pids"
        text = _read(self._file(ctrl, "cgroup.procs"))
        if text is None and not self.unified:
            text = _read(self._file("memory", "cgroup.procs"))
        return [int(x) for x in (text or "").split()]

    def oom_kills(self) -> int:
        if self.unified:
            return _kv(self._file("", "memory.events")).get("oom_kill", 0)
        return _kv(self._file("memory", "memory.oom_control")).get("oom_kill", 0)

    def stats(self) -> agent_pb2.CgroupStats:
        return self._stats_v2() if self.unified else self._stats_v1()

    def _stats_v2(self) -> agent_pb2.CgroupStats:
        st = agent_pb2.CgroupStats()
        cpu = _kv(self._file("", "cpu.stat"))
        st.cpu_stats.cpu_usage.total_usage = cpu.get("usage_usec", 0) * 1000
        st.cpu_stats.cpu_usage.usage_in_usermode = cpu.get("user_usec", 0) * 1000
        st.cpu_stats.cpu_usage.usage_in_kernelmode = cpu.get("system_usec", 0) * 1000
        st.cpu_stats.throttling_data.periods = cpu.get("nr_periods", 0)
        st.cpu_stats.throttling_data.throttled_periods = cpu.get("nr_throttled", 0)
        st.cpu_stats.throttling_data.throttled_time = cpu.get("throttled_usec", 0) * 1000
        mem = _kv(self._file("", "memory.stat"))
        ms = st.memory_stats
        ms.cache = mem.get("file", 0)
        ms.usage.usage = _int(self._file("", "memory.current"))
        ms.usage.max_usage = _int(self._file("", "memory.peak"))
        ms.usage.limit = _int(self._file("", "memory.max"), _U64_MAX)
        ms.usage.failcnt = _kv(self._file("", "memory.events")).get("max", 0)
        ms.swap_usage.usage = _int(self._file("", "memory.swap.current"))
        ms.swap_usage.limit = _int(self._file("", "memory.swap.max"), _U64_MAX)
        ms.use_hierarchy = True
        ms.stats.update(mem)
        st.pids_stats.current = _int(self._file("", "pids.current"))
        st.pids_stats.limit = _int(self._file("", "pids.max"), _U64_MAX)
        return st

    def _stats_v1(self) -> agent_pb2.CgroupStats:
        st = agent_pb2.CgroupStats()
        cu = st.cpu_stats.cpu_usage
        cu.total_usage = _int(self._file("cpuacct", "cpuacct.usage"))
        percpu = _read(self._file("cpuacct", "cpuacct.usage_percpu")) or ""
        cu.percpu_usage.extend(int(x) for x in percpu.split() if x.isdigit())
        ticks = _kv(self._file("cpuacct", "cpuacct.stat"))
        cu.usage_in_usermode = ticks.get("user", 0) * (1_000_000_000 // USER_HZ)
        cu.usage_in_kernelmode = ticks.get("system", 0) * (1_000_000_000 // USER_HZ)
        thr = _kv(self._file("cpu", "cpu.stat"))
        st.cpu_stats.throttling_data.periods = thr.get("nr_periods", 0)
        st.cpu_stats.throttling_data.throttled_periods = thr.get("nr_throttled", 0)
        st.cpu_stats.throttling_data.throttled_time = thr.get("throttled_time", 0)
        mem = _kv(self._file("memory", "memory.stat"))
        ms = st.memory_stats
        ms.cache = mem.get("total_cache", mem.get("cache", 0))
        ms.usage.usage = _int(self._file("memory", "memory.usage_in_bytes"))
        ms.usage.max_usage = _int(self._file("memory", "memory.max_usage_in_bytes"))
        ms.usage.failcnt = _int(self._file("memory", "memory.failcnt"))
        ms.usage.limit = _int(self._file("memory", "memory.limit_in_bytes"), _U64_MAX)
        ms.use_hierarchy = _int(self._file("memory", "memory.use_hierarchy")) == 1
        ms.stats.update(mem)
        st.pids_stats.current = _int(self._file("pids", "pids.current"))
        st.pids_stats.limit = _int(self._file("pids", "pids.max"), _U64_MAX)
        return st


def network_stats(pid: int, proc: str = "/proc") -> list[agent_pb2.NetworkStats]:
    """Per-interface counters from /proc/<pid>/net/dev (the container's network namespace)."""
    out = []
    for line in (_read(os.path.join(proc, str(pid), "net", "dev")) or "").splitlines()[2:]:
        name, sep, rest = line.partition(":")
        nums = rest.split()
        if not sep or len(nums) < 16 or name.strip() == "lo":
            continue
        try:
            v = [int(x) for x in nums]
        except ValueError:
            continue
        out.append(agent_pb2.NetworkStats(
            name=name.strip(), rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2], rx_dropped=v[3],
            tx_bytes=v[8], tx_packets=v[9], tx_errors=v[10], tx_dropped=v[11]))
    return out


def remove_parent(parent: str, root: str = CGROUP_ROOT) -> None:
    """rmdir the (empty) cgroup parent the agent placed containers under, in every hierarchy."""
    rel = parent.strip("/")
    if not rel:
        return
    cg = Cgroup(parent, root)
    dirs = [os.path.join(root, rel)] if cg.unified else [
        os.path.join(root, c, rel) for c in sorted(os.listdir(root))
        if not os.path.islink(os.path.join(root, c))]
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass
