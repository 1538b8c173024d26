"""Co-location facts of one sandbox, read from the host: the ``kata_colo_*`` families and the
vCPU/priority view the admin API shows.

Per priority (from the QoS resource's host cgroups ``<root>/<sandbox>/vcpu-<priority>``):
``kata_colo_vcpus{priority}``, ``kata_colo_vcpu_cpu_time_seconds{priority}`` (cpuacct usage),
``kata_colo_vcpu_periods{priority}``, ``kata_colo_vcpu_throttled_periods{priority}`` and
``kata_colo_vcpu_throttled_seconds{priority}`` (cpu.stat), ``kata_colo_priority_knob{priority,knob}``
(the values in force, read back from the cgroup files: cpu_shares/cpu_weight, cfs_quota_us with
-1 for unlimited, cfs_period_us, cfs_burst_us, cpu_idle) and ``kata_colo_priority_info{priority,
cgroup,cpuset}``. Per vCPU (also without priorities): ``kata_colo_vcpu_thread_cpu_seconds{vcpu,
priority}`` from /proc/<vmm>/task/<tid>/stat. All file reads are synchronous and meant to run in
a worker thread (:func:`collect`); a group or thread that vanished mid-read is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.errors import KataColoError
from common.prom_text import Family
from shim.mgmt import procfs

V1_KNOBS = (("cpu_shares", "cpu.shares"), ("cfs_quota_us", "cpu.cfs_quota_us"),
            ("cfs_period_us", "cpu.cfs_period_us"), ("cfs_burst_us", "cpu.cfs_burst_us"),
            ("cpu_idle", "cpu.idle"))
V2_KNOBS = (("cpu_weight", "cpu.weight"), ("cpu_idle", "cpu.idle"))


@dataclass
class VcpuView:
    """What the admin API and the collectors know about the vCPUs (taken on the event loop)."""

    vmm_pid: int
    threads: dict[int, int]  # vCPU → host TID
    assignment: dict[int, str] = field(default_factory=dict)  # vCPU → priority ("" = none)
    groups: dict[str, str] = field(default_factory=dict)  # priority → cgroup (relative)
    driver: Any = None  # the QoS cgroup driver, None without priorities


def qos_view(sandbox: Any) -> VcpuView | None:
    """The QoS resource's placement (None when the sandbox has no priorities or none placed)."""
    qos = sandbox.resource("qos")
    pid = sandbox.vmm_pid()
    if qos is None or not getattr(qos, "placed", False) or pid is None:
        return None
    manager = qos.manager
    state = manager.to_state()
    assignment = {int(k): str(v) for k, v in state.get("assignment", {}).items()}
    threads = {int(k): int(v) for k, v in state.get("vcpu_threads", {}).items()}
    groups = {p: manager.priority_group(p) for p in sorted(set(assignment.values()))}
    return VcpuView(pid, threads, assignment, groups, manager.driver)


def read_file(driver: Any, group: str, name: str) -> str | None:
    try:
        return str(driver.read(group, name)).strip()
    except (KataColoError, OSError, ValueError):
        return None


def knobs_in_force(driver: Any, group: str) -> dict[str, float]:
    """The knob values the kernel holds for ``group`` (names of ``[colo.priorities.<name>]``)."""
    out: dict[str, float] = {}
    pairs = V1_KNOBS if driver.version == 1 else V2_KNOBS
    for knob, filename in pairs:
        text = read_file(driver, group, filename)
        if text is not None and text.lstrip("-").isdigit():
            out[knob] = float(text)
    if driver.version == 2:
        text = read_file(driver, group, "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            out["cfs_quota_us"] = -1.0 if quota == "max" else float(quota)
            if period.isdigit():
                out["cfs_period_us"] = float(period)
        burst = read_file(driver, group, "cpu.max.burst")
        if burst and burst.isdigit():
            out["cfs_burst_us"] = float(burst)
    return out


def cpu_stat(driver: Any, group: str) -> dict[str, float]:
    """nr_periods, nr_throttled and throttled seconds of ``group`` (v1 ns or v2 µs files)."""
    out: dict[str, float] = {}
    for line in (read_file(driver, group, "cpu.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if not value.strip().isdigit():
            continue
        if key in ("nr_periods", "nr_throttled"):
            out[key] = float(value)
        elif key == "throttled_time":
            out["throttled_seconds"] = int(value) / 1e9
        elif key == "throttled_usec":
            out["throttled_seconds"] = int(value) / 1e6
    return out


def collect(view: VcpuView) -> list[Family]:
    """The kata_colo_* families of one sandbox (blocking file reads: call in a thread)."""
    vcpus = Family("kata_colo_vcpus", "vCPUs per priority.")
    cpu = Family("kata_colo_vcpu_cpu_time_seconds", "CPU time of the vCPU threads per priority "
                 "(host cgroup cpuacct).", "counter")
    periods = Family("kata_colo_vcpu_periods", "CFS periods of the priority's host cgroup.", "counter")
    throttled = Family("kata_colo_vcpu_throttled_periods", "Throttled CFS periods of the priority's "
                       "host cgroup.", "counter")
    throttled_s = Family("kata_colo_vcpu_throttled_seconds", "Time the priority's vCPU threads were "
                         "throttled.", "counter")
    knobs = Family("kata_colo_priority_knob", "Knob values in force in the priority's host cgroup "
                   "(cfs_quota_us -1 = unlimited).")
    info = Family("kata_colo_priority_info", "The priority's host cgroup and cpuset.")
    counts: dict[str, int] = {}
    for prio in view.assignment.values():
        counts[prio] = counts.get(prio, 0) + 1
    for prio, group in view.groups.items():
        labels = (("priority", prio),)
        vcpus.add(counts.get(prio, 0), labels)
        driver = view.driver
        try:
            cpu.add(driver.cpu_usage_ns(group) / 1e9, labels)
        except (KataColoError, OSError, ValueError):
            pass
        st = cpu_stat(driver, group)
        if "nr_periods" in st:
            periods.add(st["nr_periods"], labels)
        if "nr_throttled" in st:
            throttled.add(st["nr_throttled"], labels)
        if "throttled_seconds" in st:
            throttled_s.add(st["throttled_seconds"], labels)
        for knob, value in knobs_in_force(driver, group).items():
            knobs.add(value, (*labels, ("knob", knob)))
        info.add(1, (*labels, ("cgroup", "/" + group), ("cpuset", read_file(driver, group, "cpuset.cpus") or "")))
    threads = Family("kata_colo_vcpu_thread_cpu_seconds", "CPU time of each vCPU's host thread.", "counter")
    for vcpu, tid in sorted(view.threads.items()):
        seconds = procfs.thread_cpu_seconds(view.vmm_pid, tid)
        if seconds is not None:
            threads.add(seconds, (("vcpu", str(vcpu)), ("priority", view.assignment.get(vcpu, ""))))
    return [f for f in (vcpus, cpu, periods, throttled, throttled_s, knobs, info, threads) if f.samples]


def thread_cgroups(pid: int, tid: int) -> dict[str, str]:
    """controller(s) → cgroup path of one thread (/proc/<pid>/task/<tid>/cgroup)."""
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/task/{tid}/cgroup") as f:
            text = f.read()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1] or "unified"] = parts[2]
    return out
