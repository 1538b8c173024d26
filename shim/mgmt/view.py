"""The JSON document of ``GET /colo/sandbox``: one sandbox as an SRE sees it.

``{"id", "state", "shim_pid", "vmm_pid", "hypervisor", "agent_url", "started_at", "uptime_seconds",
"containers": [{"id", "bundle", "pid", "status", "execs": [{"id", "pid", "status"}]}],
"vcpus": [{"vcpu", "priority", "tid", "cgroup", "cgroups"}],
"priorities": {name: {"vcpus", "cgroup", "knobs" (configured), "in_force" (read back)}},
"memory": {"boot_bytes", "plugged_bytes", "ballooned_bytes", "max_bytes", "usable_bytes",
"target_bytes", "actual_bytes", "floor_bytes", "mechanisms", "guest", "resizes", "last"} | null,
"network": [{"name", "mac", "guest_mac", "mtu", "addresses", "tap"}], "overhead": {...}}``

Built from the sandbox handle, the task service's process table and the host (/proc, cgroupfs);
the guest is not asked (a hung guest cannot stall ``status``). Memory comes from the hypervisor's
MemoryControl capability when the driver has it (one QMP round trip, bounded).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from datetime import UTC, datetime
from typing import Any

from common.errors import KataColoError
from hypervisor.base import MemoryControl
from shim.mgmt import colo
from shim.mgmt.overhead import PodOverhead

MEMORY_TIMEOUT = 1.0


def containers(table: Any) -> list[dict[str, Any]]:
    out = []
    for c in table.containers():
        execs = [{"id": eid, "pid": p.pid, "status": p.status.name.lower(),
                  "exit_status": p.exit.status if p.exit else None} for eid, p in sorted(c.execs.items())]
        init = c.init
        out.append({"id": c.id, "bundle": c.bundle, "pid": init.pid, "status": init.status.name.lower(),
                    "exit_status": init.exit.status if init.exit else None, "execs": execs})
    return out


def _knobs(knobs: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(knobs).items() if v is not None}


def vcpus_and_priorities(sandbox: Any, view: colo.VcpuView | None) -> tuple[list[dict[str, Any]],
                                                                             dict[str, Any]]:
    """(per-vCPU rows, per-priority table) — blocking reads (/proc, cgroupfs): call in a thread."""
    if view is None:
        return [], {}
    rows = []
    for vcpu, tid in sorted(view.threads.items()):
        cgroups = colo.thread_cgroups(view.vmm_pid, tid)
        prio = view.assignment.get(vcpu, "")
        cgroup = "/" + view.groups[prio] if prio in view.groups else cgroups.get("cpu,cpuacct", cgroups.get(
            "cpu", cgroups.get("unified", "")))
        rows.append({"vcpu": vcpu, "priority": prio or None, "tid": tid, "cgroup": cgroup, "cgroups": cgroups})
    prios: dict[str, Any] = {}
    qos = sandbox.resource("qos")
    for prio, group in view.groups.items():
        entry: dict[str, Any] = {"vcpus": sorted(v for v, p in view.assignment.items() if p == prio),
                                 "cgroup": "/" + group}
        if qos is not None:
            p = qos.manager.config.priority(prio)
            entry["knobs"] = {**_knobs(p.knobs), "pin": p.pin}
        if view.driver is not None:
            entry["in_force"] = colo.knobs_in_force(view.driver, group)
            entry["cpuset"] = colo.read_file(view.driver, group, "cpuset.cpus")
        prios[prio] = entry
    return rows, prios


def network(sandbox: Any) -> list[dict[str, Any]]:
    res = sandbox.resource("network")
    pod = getattr(res, "pod", None)
    if pod is None:
        return []
    out = []
    taps = list(getattr(pod, "taps", []))
    for i, ep in enumerate(getattr(pod, "endpoints", [])):
        tap = taps[i] if i < len(taps) else None
        out.append({"name": ep.name, "mac": ep.mac, "mtu": ep.mtu,
                    "addresses": [f"{a.address}/{a.prefixlen}" for a in ep.addrs],
                    "guest_mac": getattr(tap, "guest_mac", None), "tap": getattr(tap, "tap_name", None),
                    "netns": getattr(pod, "netns", None)})
    return out


async def memory(sandbox: Any) -> dict[str, Any] | None:
    hv = sandbox.hv
    if not sandbox.running or not isinstance(hv, MemoryControl):
        return None
    res = sandbox.resource("memory")
    if res is not None:  # target, floor, guest numbers, last resize (shim.resources.memory)
        try:
            doc: dict[str, Any] = await asyncio.wait_for(res.view(), MEMORY_TIMEOUT)
            return doc
        except (KataColoError, TimeoutError):
            return None
    try:
        info = await asyncio.wait_for(hv.memory_info(), MEMORY_TIMEOUT)
    except (KataColoError, TimeoutError):
        return None
    return {"boot_bytes": info.boot, "plugged_bytes": info.plugged, "ballooned_bytes": info.ballooned,
            "max_bytes": info.max, "usable_bytes": info.usable}


async def sandbox_document(sandbox_id: str, sandbox: Any | None, table: Any, vcpu_view: colo.VcpuView | None,
                           overhead: PodOverhead | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": sandbox_id, "shim_pid": os.getpid(), "containers": containers(table)}
    if sandbox is None:
        doc.update(state="unknown", vmm_pid=None, vcpus=[], priorities={}, memory=None, network=[])
        return doc
    started = float(getattr(sandbox, "started_at", 0.0) or 0.0)
    hv = sandbox.hv
    url = None
    from agent_api.client.convert import agent_url

    if hv is not None:
        try:
            url = agent_url(hv.agent_address())
        except KataColoError:
            url = None
    rows, prios = await asyncio.to_thread(vcpus_and_priorities, sandbox, vcpu_view)
    doc.update(state=sandbox.state.value, vmm_pid=sandbox.vmm_pid(), hypervisor=getattr(hv, "name", None),
               agent_url=url, started_at=datetime.fromtimestamp(started, UTC).isoformat() if started else None,
               uptime_seconds=round(time.time() - started, 3) if started and sandbox.running else None,
               vcpus=rows, priorities=prios, memory=await memory(sandbox), network=network(sandbox))
    if overhead is not None:
        doc["overhead"] = {"cpu_percent": overhead.cpu_percent, "memory_bytes": overhead.memory_bytes,
                           "source": dict(overhead.source)}
    return doc
