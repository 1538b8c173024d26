"""QEMU memory control over QMP (the :class:`hypervisor.base.MemoryControl` capability).

Mechanisms (:meth:`MemoryMixin.memory_mechanisms`):

- ``virtio-mem`` (``[hypervisor.qemu] enable_virtio_mem``): the hot-pluggable memory
  (``max_memory_mib − memory_mib``) is one ``virtio-mem-pci`` device, cold-plugged with nothing
  plugged (:func:`hypervisor.qemu.cmdline.virtio_mem_args`). :meth:`~MemoryMixin.resize_memory`
  sets its ``requested-size`` (a multiple of its block size) with ``qom-set`` and waits until the
  guest driver has (un)plugged that much (``size``, woken by ``MEMORY_DEVICE_SIZE_CHANGE``): it
  grows and shrinks live.
- ``dimm`` (otherwise, with ``memory_slots``): grow by one ``pc-dimm`` (128 MiB aligned) per call;
  shrink unplugs DIMMs added earlier, newest first (the guest must be able to offline them).
- ``balloon`` (``enable_balloon``, deflate-on-oom; free page reporting with
  ``reclaim_guest_freed_memory``): :meth:`~MemoryMixin.balloon` sets the guest's target RAM
  (QEMU's ``balloon`` value = usable RAM, not the amount taken), :meth:`~MemoryMixin.balloon_info`
  reads the actual size and the guest's statistics, enabling stats polling on first use. QEMU's
  balloon sizes count boot RAM and DIMMs but not virtio-mem memory: both methods add the plugged
  virtio-mem size, so they speak of the whole usable RAM (the balloon itself can only take boot
  RAM and DIMMs). With a
  VFIO device attached QEMU disables uncoordinated discards (balloon inflation and free page
  reporting would return nothing to the host), so ``balloon`` is then not offered as a mechanism;
  the device and its statistics stay.

A resize that the guest does not complete within its timeout raises DeadlineExceeded after the
request was withdrawn to what the guest reached (the VM keeps running with that size).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HypervisorError,
    InvalidArgument,
    KataColoError,
    ResourceExhausted,
)
from hypervisor.base import BalloonInfo, MemoryInfo, VmConfig
from hypervisor.qemu import cmdline
from hypervisor.qemu.monitor import QmpMonitor

MIB = 1 << 20
MEMORY_ALIGN_MIB = 128
BALLOON_POLL_SECONDS = 2
BALLOON_PATH = "/machine/peripheral/balloon0"
VIRTIO_MEM_PATH = f"/machine/peripheral/{cmdline.VIRTIO_MEM_ID}"
RESIZE_TIMEOUT = 30.0
SIZE_POLL_SECONDS = 0.5
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

    def _vfio_attached(self) -> bool:
        cfg, _ = self._require_prepared()
        plugged: dict[str, Any] = getattr(self, "_devices", {})
        return bool(cfg.vfio) or any(getattr(p, "kind", "") == "vfio" for p in plugged.values())

    def memory_mechanisms(self) -> tuple[str, ...]:
        cfg, _ = self._require_prepared()
        opts = cmdline.options_of(cfg)
        out: list[str] = []
        if cmdline.virtio_mem_mib(cfg):
            out.append("virtio-mem")
        elif cfg.max_memory_mib > cfg.memory_mib and opts.memory_slots > 0:
            out.append("dimm")
        if opts.enable_balloon and not self._vfio_attached():
            out.append("balloon")
        return tuple(out)

    def _block_mib(self, cfg: VmConfig) -> int:
        if cmdline.virtio_mem_mib(cfg):
            return cmdline.options_of(cfg).virtio_mem_block_mib
        if cfg.max_memory_mib > cfg.memory_mib and cmdline.options_of(cfg).memory_slots > 0:
            return MEMORY_ALIGN_MIB
        return 0

    async def _virtio_mem_size(self) -> int:
        value = await self.monitor.qom_get(VIRTIO_MEM_PATH, "size")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HypervisorError(f"virtio-mem size is not a size: {value!r}")
        return value

    async def _vmem(self, cfg: VmConfig) -> int:
        return await self._virtio_mem_size() if cmdline.virtio_mem_mib(cfg) else 0

    async def memory_info(self) -> MemoryInfo:
        cfg, _ = self._require_prepared()
        dimms = sum(size for _, size in self._dimms) * MIB
        vmem = await self._vmem(cfg)
        plugged = dimms + vmem
        ballooned = 0
        if cmdline.options_of(cfg).enable_balloon:
            # QEMU's balloon counts boot RAM + DIMMs only (virtio-mem memory is not its business)
            actual = await self.monitor.query_balloon()
            ballooned = max(0, cfg.memory_mib * MIB + dimms - actual)
        top = cfg.memory_mib + (cmdline.virtio_mem_mib(cfg) or max(0, cfg.max_memory_mib - cfg.memory_mib))
        return MemoryInfo(boot=cfg.memory_mib * MIB, plugged=plugged, ballooned=ballooned,
                          max=top * MIB, block=self._block_mib(cfg) * MIB)

    def _require_balloon(self) -> None:
        cfg, _ = self._require_prepared()
        if not cmdline.options_of(cfg).enable_balloon:
            raise FailedPrecondition("VM has no balloon device")

    async def balloon(self, target_bytes: int) -> None:
        self._require_balloon()
        if "balloon" not in self.memory_mechanisms():
            raise FailedPrecondition("the balloon cannot reclaim memory while a VFIO device is attached "
                                     "(QEMU disables uncoordinated discards); use virtio-mem")
        if target_bytes <= 0:
            raise InvalidArgument(f"balloon target must be > 0, not {target_bytes}")
        cfg, _ = self._require_prepared()
        # QEMU's value excludes virtio-mem memory; the balloon cannot take that, only boot RAM
        value = max(target_bytes - await self._vmem(cfg), cmdline.MIN_MEMORY_MIB * MIB)
        await self.monitor.balloon(value)

    async def balloon_info(self) -> BalloonInfo:
        self._require_balloon()
        cfg, _ = self._require_prepared()
        mon = self.monitor
        actual = await mon.query_balloon() + await self._vmem(cfg)
        if not self._stats_polling:
            await mon.qom_set(BALLOON_PATH, "guest-stats-polling-interval", BALLOON_POLL_SECONDS)
            self._stats_polling = True
        stats: dict[str, int] = {}
        try:
            raw = await mon.qom_get(BALLOON_PATH, "guest-stats")
        except HypervisorError:
            raw = {}  # the guest has not reported yet
        raw = raw if isinstance(raw, dict) else {}
        for key, value in dict(raw.get("stats") or {}).items():
            if isinstance(value, int) and 0 <= value < _UNREPORTED:  # "no value" is -1 (as a u64)
                stats[str(key)] = value
        updated = raw.get("last-update")
        if isinstance(updated, int) and updated > 0:
            stats["last-update"] = updated
        return BalloonInfo(actual_bytes=actual, stats=stats)

    async def resize_memory(self, target_mib: int, timeout: float = RESIZE_TIMEOUT) -> int:
        """Hot(un)plug towards ``target_mib`` (boot RAM .. max): virtio-mem both ways in its
        blocks (rounded up), DIMMs as the module docstring says. Returns the size in MiB the
        guest has once it completed; DeadlineExceeded when it did not within ``timeout``."""
        cfg, _ = self._require_prepared()
        mechanisms = self.memory_mechanisms()
        info = await self.memory_info()
        top = info.max // MIB
        if not cfg.memory_mib <= target_mib <= top:
            raise InvalidArgument(f"memory target {target_mib} MiB outside {cfg.memory_mib}..{top}")
        if "virtio-mem" in mechanisms:
            return await self._resize_virtio_mem(cfg, target_mib, timeout)
        if "dimm" in mechanisms:
            return await self._resize_dimms(cfg, target_mib)
        raise FailedPrecondition("memory hotplug not configured (max_memory_mib with memory_slots or "
                                 "enable_virtio_mem)")

    async def _resize_virtio_mem(self, cfg: VmConfig, target_mib: int, timeout: float) -> int:
        block = cmdline.options_of(cfg).virtio_mem_block_mib
        want = min(-(-(target_mib - cfg.memory_mib) // block) * block, cmdline.virtio_mem_mib(cfg)) * MIB
        mon = self.monitor
        cid = cmdline.VIRTIO_MEM_ID
        changed = asyncio.Event()

        def on_change(ev: dict[str, Any]) -> None:
            if (ev.get("data") or {}).get("id") == cid:
                changed.set()

        mon.add_listener("MEMORY_DEVICE_SIZE_CHANGE", on_change)
        try:
            await mon.qom_set(VIRTIO_MEM_PATH, "requested-size", want)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                size = await self._virtio_mem_size()
                if size == want:
                    return cfg.memory_mib + size // MIB
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                changed.clear()
                # the event is rate-limited by QEMU: poll as well
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(SIZE_POLL_SECONDS, remaining))
        finally:
            mon.remove_listener("MEMORY_DEVICE_SIZE_CHANGE", on_change)
        # withdraw the request to what the guest has (it would otherwise keep (un)plugging)
        size = await self._virtio_mem_size()
        with contextlib.suppress(KataColoError):
            await mon.qom_set(VIRTIO_MEM_PATH, "requested-size", size)
        verb = "plugged" if want > size else "unplugged"
        raise DeadlineExceeded(f"virtio-mem: the guest {verb} only to {cfg.memory_mib + size // MIB} MiB "
                               f"of {cfg.memory_mib + want // MIB} MiB within {timeout:.0f}s "
                               f"(request withdrawn; the VM keeps {cfg.memory_mib + size // MIB} MiB)")

    async def _resize_dimms(self, cfg: VmConfig, target_mib: int) -> int:
        slots = cmdline.options_of(cfg).memory_slots
        current = cfg.memory_mib + sum(size for _, size in self._dimms)
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
            await mon.object_add("memory-backend-ram", f"mem{n}", size=add * MIB)
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
