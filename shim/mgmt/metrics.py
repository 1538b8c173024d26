"""``GET /metrics`` of one shim: kata's family names exactly, rendered by :mod:`common.prom_text`.

Families, in order:

* ``kata_shim_*``: ``rpc_durations_histogram_milliseconds{action}`` for every Task RPC (kata's
  action names: ``create``, ``close_io``, ``resize_pty``...; buckets 1..512 ms =
  ExponentialBuckets(1,2,10)), ``agent_rpc_durations_histogram_milliseconds{action=grpc.<X>Request}``,
  threads, proc_status, proc_stat, io_stat, fds, netdev of the shim process, and
  ``pod_overhead_cpu`` / ``pod_overhead_memory_in_bytes`` (:mod:`shim.mgmt.overhead`).
* ``kata_hypervisor_*``: the same per-process families of the VMM (/proc/<vmm pid>).
* ``kata_colo_*``: per priority vCPU CPU time, throttling and knobs in force
  (:mod:`shim.mgmt.colo`), the VM's memory as the hypervisor sees it (MemoryControl) and as the
  memory resource sizes it (``kata_colo_memory_*``, :mod:`shim.mgmt.memory`), the guest
  metrics' own health (:mod:`shim.mgmt.guest`).
* ``kata_agent_*`` / ``kata_guest_*``: the guest's, validated (:mod:`shim.mgmt.guest`).

Task RPC durations come from :func:`timed_service`, a wrapper around the Task service object
registered with the ttrpc server (neither ttrpc nor the task service changes); agent RPC
durations from :attr:`agent_api.client.rpc.AgentClient.call_observer`.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common.errors import KataColoError
from common.prom_text import EXP_BUCKETS_MS, Family, Labels, histogram, labelled, render
from hypervisor.base import MemoryControl
from shim.mgmt import colo, procfs
from shim.mgmt.guest import GuestMetrics, agent_fetch
from shim.mgmt.memory import families as memory_families
from shim.mgmt.overhead import PodOverhead

TASK_RPCS = ("State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
             "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown")
MEMORY_TIMEOUT = 1.0
VCPU_TIMEOUT = 1.0


def action_name(rpc: str) -> str:
    """Task RPC → kata's action label: ``CloseIO`` → ``close_io``, ``ResizePty`` → ``resize_pty``."""
    return "close_io" if rpc == "CloseIO" else re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()


class Histogram:
    """A labelled histogram in milliseconds with kata's buckets."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = EXP_BUCKETS_MS) -> None:
        self.name = name
        self.help = help_
        self.buckets = buckets
        self._series: dict[str, list[float]] = {}  # label → [count per bucket..., sum, count]

    def observe(self, label: str, milliseconds: float) -> None:
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = [0.0] * (len(self.buckets) + 2)
        i = bisect.bisect_left(self.buckets, milliseconds)
        if i < len(self.buckets):
            series[i] += 1
        series[-2] += milliseconds
        series[-1] += 1

    def count(self, label: str) -> int:
        series = self._series.get(label)
        return int(series[-1]) if series else 0

    def family(self, label_name: str = "action") -> Family:
        rows = []
        for label, series in sorted(self._series.items()):
            cumulative, running = [], 0
            for n in series[:len(self.buckets)]:
                running += int(n)
                cumulative.append(running)
            labels: Labels = ((label_name, label),)
            rows.append((labels, cumulative, series[-2], int(series[-1])))
        return histogram(self.name, self.help, self.buckets, rows)


def timed_service(service: Any, hist: Histogram) -> Any:
    """A proxy of ``service`` whose Task RPC methods record their duration in ``hist``."""

    class Timed:
        def __getattr__(self, name: str) -> Any:
            attr = getattr(service, name)
            if name not in TASK_RPCS or not callable(attr):
                return attr
            action = action_name(name)

            @functools.wraps(attr)
            async def call(request: Any, ctx: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await attr(request, ctx)
                finally:
                    hist.observe(action, (time.perf_counter() - started) * 1e3)
            return call

    return Timed()


class ShimMetrics:
    """Renders one shim's /metrics. ``sandbox`` is the VM sandbox (None for a backend without one);
    ``containers`` lists the container ids the task service holds."""

    def __init__(self, sandbox: Any | None, containers: Callable[[], list[str]]) -> None:
        self.sandbox = sandbox
        self.task_rpc = Histogram("kata_shim_rpc_durations_histogram_milliseconds", "RPC latency distributions.")
        self.agent_rpc = Histogram("kata_shim_agent_rpc_durations_histogram_milliseconds",
                                   "RPC latency distributions.")
        self.guest = GuestMetrics(agent_fetch(sandbox)) if sandbox is not None else None
        self.overhead = PodOverhead(sandbox, containers) if sandbox is not None else None
        self._vcpus: tuple[float, colo.VcpuView] | None = None
        self.scrapes = 0

    def observe_agent_rpc(self, method: str, seconds: float) -> None:
        self.agent_rpc.observe(f"grpc.{method}Request", seconds * 1e3)

    async def _vcpu_view(self) -> colo.VcpuView | None:
        """The QoS placement, else {vCPU: TID} from the hypervisor (cached 10 s: threads change
        only with vCPU hotplug)."""
        sb = self.sandbox
        if sb is None or not sb.running:
            return None
        view = colo.qos_view(sb)
        if view is not None:
            return view
        now = time.monotonic()
        if self._vcpus is not None and now - self._vcpus[0] < 10.0:
            return self._vcpus[1]
        pid = sb.vmm_pid()
        if sb.hv is None or pid is None:
            return None
        try:
            threads = await asyncio.wait_for(sb.hv.vcpu_threads(), VCPU_TIMEOUT)
        except (KataColoError, TimeoutError):
            return None
        view = colo.VcpuView(pid, dict(threads))
        self._vcpus = (now, view)
        return view

    async def _memory(self) -> list[Family]:
        hv = self.sandbox.hv if self.sandbox is not None else None
        if not isinstance(hv, MemoryControl):
            return []
        elastic: list[Family] = []
        res = self.sandbox.resource("memory") if self.sandbox is not None else None
        if res is not None:
            with contextlib.suppress(KataColoError, TimeoutError):
                elastic = memory_families(await asyncio.wait_for(res.view(), MEMORY_TIMEOUT))
        try:
            info = await asyncio.wait_for(hv.memory_info(), MEMORY_TIMEOUT)
        except (KataColoError, TimeoutError):
            return []
        return [labelled("kata_colo_vm_memory_bytes", "The VM's memory as the hypervisor sees it.", "item",
                         [("boot", info.boot), ("plugged", info.plugged), ("ballooned", info.ballooned),
                          ("max", info.max), ("usable", info.usable)]), *elastic]

    def _host_families(self, vmm_pid: int | None, view: colo.VcpuView | None) -> list[Family]:
        """Everything read from /proc and cgroupfs (blocking: runs in a worker thread)."""
        fams = procfs.process_families("kata_shim", "self")
        if vmm_pid is not None:
            fams += procfs.process_families("kata_hypervisor", vmm_pid)
        if view is not None:
            fams += colo.collect(view)
        return fams

    async def render(self) -> str:
        self.scrapes += 1
        sb = self.sandbox
        running = sb is not None and sb.running
        view = await self._vcpu_view()
        guest_text = ""
        pending: list[Awaitable[Any]] = [asyncio.to_thread(self._host_families,
                                                           sb.vmm_pid() if running and sb is not None else None, view)]
        if running:
            pending.append(self._memory())
            if self.guest is not None:
                pending.append(self.guest.get())
        results = await asyncio.gather(*pending)
        host: list[Family] = results[0]
        memory: list[Family] = results[1] if running else []
        if running and self.guest is not None:
            guest_text = results[2]
        fams = [self.task_rpc.family(), self.agent_rpc.family(), *host, *memory]
        if self.overhead is not None:
            fams += self.overhead.families()
            self.overhead.kick()
        if self.guest is not None:
            fams += self.guest.families()
        return render(f for f in fams if f.samples) + guest_text

    async def close(self) -> None:
        for part in (self.guest, self.overhead):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.close()
