"""Guest-wide facts and knobs: CPU/memory onlining, GetGuestDetails, Prometheus metrics."""
from __future__ import annotations

import asyncio
import glob
import os
import resource
import time

from agent_api.agent import AGENT_VERSION
from proto.kata import agent_pb2

SYS_CPU = "/sys/devices/system/cpu"
SYS_MEM = "/sys/devices/system/memory"
STORAGE_HANDLERS = ["9p", "virtio-fs", "ephemeral"]
ONLINE_RETRIES = 50


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


def online_cpus(sys_cpu: str = SYS_CPU, limit: int = 0) -> int:
    """Write 1 to the ``online`` file of offline CPUs (at most ``limit``, 0 = all)."""
    done = 0
    for path in sorted(glob.glob(os.path.join(sys_cpu, "cpu[0-9]*", "online")),
                       key=lambda p: int(os.path.basename(os.path.dirname(p))[3:])):
        if limit and done >= limit:
            break
        if _read(path) == "0" and _write(path, "1"):
            done += 1
    return done


def online_memory(sys_mem: str = SYS_MEM) -> int:
    done = 0
    for path in glob.glob(os.path.join(sys_mem, "memory[0-9]*", "state")):
        if _read(path) == "offline" and _write(path, "online"):
            done += 1
    return done


async def online_cpu_mem(req: agent_pb2.OnlineCPUMemRequest, *, sys_cpu: str = SYS_CPU,
                         sys_mem: str = SYS_MEM) -> None:
    async def work() -> None:
        remaining = req.nb_cpus
        for _ in range(ONLINE_RETRIES):  # hotplugged CPUs may appear a little later
            remaining -= online_cpus(sys_cpu, remaining) if remaining else 0
            if remaining <= 0:
                break
            await asyncio.sleep(0.1)
        if req.nb_cpus == 0:
            online_cpus(sys_cpu)
        if not req.cpu_only:
            online_memory(sys_mem)

    if req.wait:
        await work()
    else:
        asyncio.get_running_loop().create_task(work())


def guest_details(req: agent_pb2.GuestDetailsRequest, *, sys_mem: str = SYS_MEM) -> agent_pb2.GuestDetailsResponse:
    resp = agent_pb2.GuestDetailsResponse()
    if req.mem_block_size:
        text = _read(os.path.join(sys_mem, "block_size_bytes"))
        resp.mem_block_size_bytes = int(text, 16) if text else 0
    if req.mem_hotplug_probe:
        resp.support_mem_hotplug_probe = os.path.exists(os.path.join(sys_mem, "probe"))
    d = resp.agent_details
    d.version = AGENT_VERSION
    d.init_daemon = os.getpid() == 1
    d.storage_handlers.extend(STORAGE_HANDLERS)
    d.supports_seccomp = os.path.exists("/proc/self/status") and "Seccomp:" in _read("/proc/self/status")
    return resp


def _metric(lines: list[str], name: str, kind: str, help_: str, value: float,
            labels: str = "") -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")
    lines.append(f"{name}{labels} {value}")


def metrics_text(proc: str = "/proc") -> str:
    """Prometheus exposition of the agent process and guest-wide /proc figures."""
    lines: list[str] = []
    ru = resource.getrusage(resource.RUSAGE_SELF)
    _metric(lines, "kata_agent_process_cpu_seconds_total", "counter",
            "CPU time of the agent", ru.ru_utime + ru.ru_stime)
    status = {k: v for k, _, v in (ln.partition(":") for ln in _read(f"{proc}/self/status").splitlines())}
    rss_kb = status.get("VmRSS", "0 kB").split()[0]
    _metric(lines, "kata_agent_process_resident_memory_bytes", "gauge",
            "resident memory of the agent", int(rss_kb) * 1024 if rss_kb.isdigit() else 0)
    try:
        fds = len(os.listdir(f"{proc}/self/fd"))
    except OSError:
        fds = 0
    _metric(lines, "kata_agent_process_open_fds", "gauge", "open fds of the agent", fds)
    _metric(lines, "kata_agent_scrape_timestamp_seconds", "gauge", "time of this scrape", time.time())
    load = _read(f"{proc}/loadavg").split()
    for i, label in enumerate(("1", "5", "15")):
        if len(load) > i:
            _metric(lines, f"kata_guest_load{label}", "gauge", f"{label}-minute load average",
                    float(load[i]))
    mem = {}
    for line in _read(f"{proc}/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            mem[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    lines.append("# HELP kata_guest_meminfo guest /proc/meminfo in bytes")
    lines.append("# TYPE kata_guest_meminfo gauge")
    for key in ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapTotal", "SwapFree"):
        if key in mem:
            lines.append(f'kata_guest_meminfo{{item="{key}"}} {mem[key]}')
    stat = _read(f"{proc}/stat").splitlines()
    if stat and stat[0].startswith("cpu "):
        names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
        lines.append("# HELP kata_guest_cpu_time_seconds_total guest CPU time by mode")
        lines.append("# TYPE kata_guest_cpu_time_seconds_total counter")
        for name, ticks in zip(names, stat[0].split()[1:]):
            lines.append(f'kata_guest_cpu_time_seconds_total{{mode="{name}"}} {int(ticks) / 100}')
    return "\n".join(lines) + "\n"
