"""Guest-wide facts and knobs: CPU/memory onlining, GetGuestDetails, Prometheus metrics (the
latter in :mod:`agent_api.agent.guest_metrics`)."""
from __future__ import annotations

import asyncio
import glob
import os

from agent_api.agent import AGENT_VERSION, guest_metrics
from proto.kata import agent_pb2

SYS_CPU = "/sys/devices/system/cpu"
SYS_MEM = "/sys/devices/system/memory"
STORAGE_HANDLERS = ["9p", "virtio-fs", "ephemeral"]
ONLINE_RETRIES = 50


def read_value(path: str) -> str:
    """A sysfs/procfs value, stripped ("" when it cannot be read)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def write_value(path: str, value: str) -> bool:
    """Write a sysfs knob; False when the kernel refused it."""
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
        if read_value(path) == "0" and write_value(path, "1"):
            done += 1
    return done


def online_memory(sys_mem: str = SYS_MEM) -> int:
    done = 0
    for path in glob.glob(os.path.join(sys_mem, "memory[0-9]*", "state")):
        if read_value(path) == "offline" and write_value(path, "online"):
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
        text = read_value(os.path.join(sys_mem, "block_size_bytes"))
        resp.mem_block_size_bytes = int(text, 16) if text else 0
    if req.mem_hotplug_probe:
        resp.support_mem_hotplug_probe = os.path.exists(os.path.join(sys_mem, "probe"))
    d = resp.agent_details
    d.version = AGENT_VERSION
    d.init_daemon = os.getpid() == 1
    d.storage_handlers.extend(STORAGE_HANDLERS)
    d.supports_seccomp = os.path.exists("/proc/self/status") and "Seccomp:" in read_value("/proc/self/status")
    return resp


def metrics_text(proc: str = "/proc") -> str:
    """GetMetrics: kata's kata_agent_* and kata_guest_* families (:mod:`agent_api.agent.guest_metrics`)."""
    return guest_metrics.metrics_text(proc)
