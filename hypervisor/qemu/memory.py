"""QEMU memory control over QMP (the :class:`hypervisor.base.MemoryControl` capability).

Mechanisms: pc-dimm hotplug (grow in 128 MiB DIMMs, shrink by unplugging DIMMs added earlier) and
virtio-balloon (``balloon`` sets the guest's target RAM; ``balloon_info`` reads the actual size
and the guest's statistics, enabling stats polling on first use).
"""
from __future__ import annotations

import contextlib

from common.errors import FailedPrecondition, HypervisorError, InvalidArgument, KataColoError, ResourceExhausted
from hypervisor.base import BalloonInfo, MemoryInfo, VmConfig
from hypervisor.qemu import cmdline
from hypervisor.qemu.monitor import QmpMonitor

MEMORY_ALIGN_MIB = 128
BALLOON_POLL_SECONDS = 2
BALLOON_PATH = "/machine/peripheral/balloon0"
_UNREPORTED = 2**63


class MemoryMixin:
    """Needs ``self.monitor`` and ``self._require_prepared()`` from the driver."""

    _dimms: list[tuple[str, int]]
    _stats_polling: bool

    @property
    def monitor(self) -> QmpMonitor:  # provided by the driver
        raise NotImplementedError

    def _require_prepared(self) -> tuple[VmConfig, object]:  # provided by the driver
        raise NotImplementedError

    def memory_mechanisms(self) -> tuple[str, ...]:
        cfg, _ = self._require_prepared()
        opts = cmdline.options_of(cfg)
        out: list[str] = []
        if cfg.max_memory_mib > cfg.memory_mib and opts.memory_slots > 0:
            out.append("dimm")
        if opts.enable_balloon:
            out.append("balloon")
        return tuple(out)

    async def memory_info(self) -> MemoryInfo:
        cfg, _ = self._require_prepared()
        plugged = sum(size for _, size in self._dimms) << 20
        ballooned = 0
        if "balloon" in self.memory_mechanisms():
            actual = await self.monitor.query_balloon()
            ballooned = max(0, (cfg.memory_mib << 20) + plugged - actual)
        return MemoryInfo(boot=cfg.memory_mib << 20, plugged=plugged, ballooned=ballooned,
                          max=max(cfg.max_memory_mib, cfg.memory_mib) << 20)

    def _require_balloon(self) -> None:
        if "balloon" not in self.memory_mechanisms():
            raise FailedPrecondition("VM has no balloon device")

    async def balloon(self, target_bytes: int) -> None:
        self._require_balloon()
        if target_bytes <= 0:
            raise InvalidArgument(f"balloon target must be > 0, not {target_bytes}")
        await self.monitor.balloon(target_bytes)

    async def balloon_info(self) -> BalloonInfo:
        self._require_balloon()
        mon = self.monitor
        actual = await mon.query_balloon()
        if not self._stats_polling:
            await mon.qom_set(BALLOON_PATH, "guest-stats-polling-interval", BALLOON_POLL_SECONDS)
            self._stats_polling = True
        stats: dict[str, int] = {}
        try:
            raw = await mon.qom_get(BALLOON_PATH, "guest-stats")
        except HypervisorError:
            raw = {}  # the guest has not reported yet
        for key, value in dict(raw.get("stats", {})).items():
            if 0 <= int(value) < _UNREPORTED:  # QEMU reports "no value" as -1 (as a u64)
                stats[str(key)] = int(value)
        return BalloonInfo(actual_bytes=actual, stats=stats)

    async def resize_memory(self, target_mib: int) -> int:
        """Grow by one pc-dimm (128 MiB aligned) or shrink by unplugging DIMMs added earlier
        (newest first, never below ``target_mib``). Returns the resulting size in MiB."""
        cfg, _ = self._require_prepared()
        if "dimm" not in self.memory_mechanisms():
            raise FailedPrecondition("memory hotplug not configured (max_memory_mib/memory_slots)")
        slots = cmdline.options_of(cfg).memory_slots
        current = cfg.memory_mib + sum(size for _, size in self._dimms)
        if not cfg.memory_mib <= target_mib <= cfg.max_memory_mib:
            raise InvalidArgument(f"memory target {target_mib} MiB outside "
                                  f"{cfg.memory_mib}..{cfg.max_memory_mib}")
        mon = self.monitor
        if target_mib > current:
            if len(self._dimms) >= slots:
                raise ResourceExhausted("all memory slots are in use")
            add = -(-(target_mib - current) // MEMORY_ALIGN_MIB) * MEMORY_ALIGN_MIB
            add = min(add, cfg.max_memory_mib - current)
            if add <= 0:
                return current
            n = len(self._dimms)
            while any(name == f"dimm{n}" for name, _ in self._dimms):
                n += 1
            await mon.object_add("memory-backend-ram", f"mem{n}", size=add << 20)
            try:
                await mon.device_add("pc-dimm", f"dimm{n}", memdev=f"mem{n}")
            except KataColoError:
                with contextlib.suppress(KataColoError):
                    await mon.object_del(f"mem{n}")
                raise
            self._dimms.append((f"dimm{n}", add))
            return current + add
        while self._dimms and current - self._dimms[-1][1] >= target_mib:
            name, size = self._dimms[-1]
            await mon.device_del(name)
            await mon.object_del("mem" + name[len("dimm"):])
            self._dimms.pop()
            current -= size
        return current
