"""Pod overhead, kata's two-snapshot method (shim_metrics.go getPodOverhead).

Two snapshots of (host CPU time of the sandbox, Σ guest containers' CPU time) taken
:data:`INTERVAL` apart give ``cpu% = host Δcpu/Δt·100 − guest Δcpu/Δt·100``; ``memory = host
memory − Σ guest containers' memory usage``. As in kata the measurement runs in the background
after a ``/metrics`` call and its result is served by the NEXT scrape.

Host side: CPU from the sandbox's QoS group (the cpuacct group the QoS resource placed every
VMM thread under: the pod cgroup with ``sandbox_cgroup_only``, else ``<colo root>/<sandbox>``)
when there is one, else from the VMM process (utime+stime of all its threads). Memory: the VMM
process's RSS (the pod cgroup's memory usage also counts the shim and page cache, which are not
VM overhead). :attr:`PodOverhead.source` names what was used;
``kata_colo_pod_overhead_source{resource,source}`` exports it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from common.errors import KataColoError
from common.prom_text import Family, gauge
from shim.mgmt import procfs

log = logging.getLogger(__name__)

INTERVAL = 1.0
STATS_TIMEOUT = 3.0


@dataclass(frozen=True)
class Snapshot:
    at: float
    host_cpu_s: float
    guest_cpu_s: float
    host_mem: int
    guest_mem: int


class PodOverhead:
    def __init__(self, sandbox: Any, containers: Callable[[], list[str]]) -> None:
        self.sandbox = sandbox
        self.containers = containers
        self.cpu_percent: float | None = None
        self.memory_bytes: float | None = None
        self.source = {"cpu": "", "memory": ""}
        self._task: asyncio.Task[None] | None = None

    def _host(self) -> tuple[float, int] | None:
        pid = self.sandbox.vmm_pid()
        if pid is None:
            return None
        qos = self.sandbox.resource("qos")
        cpu: float | None = None
        if qos is not None and getattr(qos, "placed", False):
            manager = qos.manager
            with contextlib.suppress(KataColoError, OSError, ValueError):
                cpu = manager.driver.cpu_usage_ns(manager.sandbox_group) / 1e9
                self.source["cpu"] = f"cgroup /{manager.sandbox_group}"
        if cpu is None:
            cpu = procfs.cpu_seconds(pid)
            self.source["cpu"] = f"process {pid}"
        rss = procfs.rss_bytes(pid)
        self.source["memory"] = f"process {pid} rss"
        if cpu is None or rss is None:
            return None
        return cpu, rss

    async def _guest(self) -> tuple[float, int]:
        agent = self.sandbox.require_agent()
        cpu_ns = mem = 0
        for cid in self.containers():
            stats = await agent.stats(cid)
            cpu_ns += int(getattr(stats, "cpu_usage_ns", 0) or 0)
            mem += int(getattr(stats, "memory_usage", 0) or 0)
        return cpu_ns / 1e9, mem

    async def snapshot(self) -> Snapshot | None:
        host = await asyncio.to_thread(self._host)
        if host is None:
            return None
        guest_cpu, guest_mem = await asyncio.wait_for(self._guest(), STATS_TIMEOUT)
        return Snapshot(time.monotonic(), host[0], guest_cpu, host[1], guest_mem)

    async def measure(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        try:
            first = await self.snapshot()
            if first is None:
                return
            await sleep(INTERVAL)
            second = await self.snapshot()
        except (KataColoError, TimeoutError) as exc:
            log.debug("pod overhead: %s", exc)
            return
        if second is None:
            return
        self.cpu_percent, self.memory_bytes = compute(first, second)

    def kick(self) -> None:
        """Start a measurement unless one runs (called after each /metrics)."""
        if self.sandbox.running and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self.measure())

    def families(self) -> list[Family]:
        fams = [gauge("kata_shim_pod_overhead_cpu", "Kata Pod overhead for CPU resources(percent).",
                      self.cpu_percent or 0.0),
                gauge("kata_shim_pod_overhead_memory_in_bytes", "Kata Pod overhead for memory resources(bytes).",
                      self.memory_bytes or 0.0)]
        src = Family("kata_colo_pod_overhead_source", "Where the host side of the pod overhead is read.")
        for resource, where in self.source.items():
            if where:
                src.add(1, (("resource", resource), ("source", where)))
        if src.samples:
            fams.append(src)
        return fams

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def compute(first: Snapshot, second: Snapshot) -> tuple[float, float]:
    """(cpu percent, memory bytes) from two snapshots, kata's calcOverhead."""
    dt = second.at - first.at
    if dt <= 0:
        return 0.0, float(second.host_mem - second.guest_mem)
    host = (second.host_cpu_s - first.host_cpu_s) / dt * 100
    guest = (second.guest_cpu_s - first.guest_cpu_s) / dt * 100
    return host - guest, float(second.host_mem - second.guest_mem)
