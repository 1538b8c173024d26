"""A simulated VM for the memory resource's unit tests: MemoryControl over sizes that a
"guest" moves towards the requested values at a set rate (or not at all: ``stuck_*``), with
guest memory numbers the agent double reports. Every call is recorded in ``calls``."""
from __future__ import annotations

import asyncio
from typing import Any

from common.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from hypervisor.base import BalloonInfo, MemoryInfo

MIB = 1 << 20


class SimVm:
    """``mechanisms`` any of virtio-mem/dimm/balloon; sizes in MiB."""

    def __init__(self, *, boot: int = 512, max_mib: int = 1024, mechanisms: tuple[str, ...] = ("virtio-mem", "balloon"),
                 block: int = 2, rate_mib_per_tick: int = 64) -> None:
        self.boot, self.max_mib, self.mech, self.block = boot, max_mib, mechanisms, block
        self.plugged = 0            # MiB the guest has plugged
        self.requested = 0          # MiB requested from virtio-mem
        self.inflate_target = 0     # MiB the balloon should hold (QEMU: set from the size at the command)
        self.inflated = 0           # MiB the balloon holds
        self.rate = rate_mib_per_tick
        self.stuck_unplug = False   # the guest cannot unplug (blocks in use)
        self.stuck_balloon = False  # the balloon driver does not move
        self.calls: list[tuple[str, Any]] = []
        self.stats: dict[str, int] = {}
        self._ticker: asyncio.Task[None] | None = None

    # the "guest": moves a little every tick
    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            if self.plugged < self.requested:
                self.plugged = min(self.requested, self.plugged + self.rate)
            elif self.plugged > self.requested and not self.stuck_unplug:
                self.plugged = max(self.requested, self.plugged - self.rate)
            if not self.stuck_balloon:
                if self.inflated < self.inflate_target:
                    self.inflated = min(self.inflate_target, self.inflated + self.rate)
                elif self.inflated > self.inflate_target:
                    self.inflated = max(self.inflate_target, self.inflated - self.rate)

    @property
    def balloon_actual(self) -> int:
        """QEMU's query-balloon: the VM's RAM now minus what the balloon holds."""
        return self.boot + self.plugged - self.inflated

    # MemoryControl
    def memory_mechanisms(self) -> tuple[str, ...]:
        return self.mech

    async def memory_info(self) -> MemoryInfo:
        total = self.boot + self.plugged
        ballooned = self.inflated if "balloon" in self.mech else 0
        hot = "virtio-mem" in self.mech or "dimm" in self.mech
        return MemoryInfo(boot=self.boot * MIB, plugged=self.plugged * MIB, ballooned=ballooned * MIB,
                          max=(self.max_mib if hot else total) * MIB, block=(self.block if hot else 0) * MIB)

    async def resize_memory(self, target_mib: int, timeout: float = 30.0) -> int:
        self.calls.append(("resize_memory", target_mib))
        want = max(0, min(-(-(target_mib - self.boot) // self.block) * self.block, self.max_mib - self.boot))
        self.requested = want
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.plugged != want:
            if loop.time() > deadline:
                self.requested = self.plugged
                raise DeadlineExceeded(f"virtio-mem: the guest reached {self.boot + self.plugged} MiB")
            await asyncio.sleep(0.01)
        return self.boot + self.plugged

    async def balloon(self, target_bytes: int) -> None:
        if "balloon" not in self.mech:
            raise FailedPrecondition("no balloon")
        self.calls.append(("balloon", target_bytes // MIB))
        self.inflate_target = max(0, self.boot + self.plugged - target_bytes // MIB)

    async def balloon_info(self) -> BalloonInfo:
        if "balloon" not in self.mech:
            raise FailedPrecondition("no balloon")
        return BalloonInfo(actual_bytes=self.balloon_actual * MIB, stats=dict(self.stats))


class SimAgent:
    """The GuestAgent memory calls: the guest has ``used`` MiB in use (kernel included)."""

    def __init__(self, vm: SimVm, used_mib: int = 100) -> None:
        self.vm = vm
        self.used = used_mib
        self.told: list[dict[str, Any]] = []
        self.fail = False
        self.hang = False
        self.lie: dict[str, Any] | None = None

    async def guest_memory(self) -> dict[str, Any]:
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail:
            raise Unavailable("agent gone")
        if self.lie is not None:
            return dict(self.lie)
        usable = self.vm.balloon_actual if "balloon" in self.vm.mech else self.vm.boot + self.vm.plugged
        return {"total_bytes": (self.vm.boot + self.vm.plugged) * MIB,
                "available_bytes": max(0, usable - self.used) * MIB, "free_bytes": 0, "cached_bytes": 0,
                "block_size_bytes": 128 * MIB, "offline_blocks": 0}

    async def set_memory(self, **state: Any) -> dict[str, Any]:
        self.told.append(state)
        return await self.guest_memory()
