"""Cloud Hypervisor memory control over ``vm.resize`` (the :class:`hypervisor.base.MemoryControl`
capability).

Mechanisms: memory hotplug beyond boot RAM up to ``max_memory_mib`` — ``dimm`` (CH's ACPI method:
grows in 128 MiB blocks and, as in kata, a smaller target is a no-op because ACPI memory never
shrinks while the guest runs) or ``virtio-mem`` (2 MiB blocks, both ways) — and ``balloon``.

``vm.resize desired_ram`` is the VM's total RAM (boot + plugged). ``desired_balloon`` is the
amount the balloon REMOVES from the guest — the opposite of QEMU's ``balloon`` target — so
:meth:`MemoryMixin.balloon` turns the target usable size into ``total − target``. Sizes are read
back from ``vm.info`` (``config.memory`` as CH updates it on resize, ``memory_actual_size`` =
usable RAM). The API has no balloon statistics (openapi 0.3.0), so ``BalloonInfo.stats`` is empty.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from common.errors import DeadlineExceeded, FailedPrecondition, HypervisorError, InvalidArgument
from hypervisor.base import BalloonInfo, MemoryInfo, VmConfig
from hypervisor.clh import vmconfig
from hypervisor.clh.api import ClhApi

T = TypeVar("T")
MIB = 1 << 20


def _int(obj: Any, key: str, default: int = 0) -> int:
    value = obj.get(key, default) if isinstance(obj, dict) else default
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HypervisorError(f"cloud-hypervisor vm.info: {key} is not a size: {value!r}")
    return value


class MemoryMixin:
    """Needs ``api``, ``_call`` and ``_require_prepared`` from the driver."""

    @property
    def api(self) -> ClhApi:  # provided by the driver
        raise NotImplementedError

    async def _call(self, what: str, call: Awaitable[T]) -> T:  # provided by the driver
        raise NotImplementedError

    def _require_prepared(self) -> tuple[VmConfig, object]:  # provided by the driver
        raise NotImplementedError

    def memory_mechanisms(self) -> tuple[str, ...]:
        cfg, _ = self._require_prepared()
        opts = vmconfig.options_of(cfg)
        out: list[str] = []
        if vmconfig.hotplug_mib(cfg):
            out.append("virtio-mem" if opts.hotplug_method == "virtio-mem" else "dimm")
        if opts.enable_balloon and not cfg.vfio:  # VFIO pins guest RAM: inflating returns nothing
            out.append("balloon")
        return tuple(out)

    async def memory_info(self) -> MemoryInfo:
        cfg, _ = self._require_prepared()
        info = await self._call("vm.info", self.api.info())
        memory = info.get("config", {}).get("memory") if isinstance(info.get("config"), dict) else None
        boot = cfg.memory_mib * MIB
        if vmconfig.options_of(cfg).hotplug_method == "virtio-mem":
            plugged = _int(memory, "hotplugged_size")
        else:  # ACPI: CH raises config.memory.size to the new total
            plugged = max(0, _int(memory, "size", boot) - boot)
        ballooned = 0
        if "balloon" in self.memory_mechanisms():
            ballooned = max(0, boot + plugged - _int(info, "memory_actual_size", boot + plugged))
        block = 0
        if vmconfig.hotplug_mib(cfg):
            block = (vmconfig.VIRTIO_MEM_BLOCK_MIB if vmconfig.options_of(cfg).hotplug_method == "virtio-mem"
                     else vmconfig.ACPI_BLOCK_MIB) * MIB
        return MemoryInfo(boot=boot, plugged=plugged, ballooned=ballooned,
                          max=boot + vmconfig.hotplug_mib(cfg) * MIB, block=block)

    async def resize_memory(self, target_mib: int, timeout: float = 30.0) -> int:
        """Plug memory towards ``target_mib`` (block-aligned, capped at the hotplug size);
        virtio-mem also unplugs. Returns the resulting size in MiB. CH's ``vm.resize`` answers
        once the request is made and its API does not show what the guest has plugged, so
        ``timeout`` bounds only that call."""
        cfg, _ = self._require_prepared()
        mechanisms = self.memory_mechanisms()
        if "dimm" not in mechanisms and "virtio-mem" not in mechanisms:
            raise FailedPrecondition("memory hotplug not configured (max_memory_mib)")
        top = cfg.memory_mib + vmconfig.hotplug_mib(cfg)
        if not cfg.memory_mib <= target_mib <= top:
            raise InvalidArgument(f"memory target {target_mib} MiB outside {cfg.memory_mib}..{top}")
        mem = await self.memory_info()
        current = (mem.boot + mem.plugged) // MIB
        if "dimm" in mechanisms:
            if target_mib <= current:
                return current  # ACPI memory cannot be unplugged (kata: "nothing to do")
            block = vmconfig.ACPI_BLOCK_MIB
            new = min(current + -(-(target_mib - current) // block) * block, top)
        else:
            block = vmconfig.VIRTIO_MEM_BLOCK_MIB
            new = min(-(-target_mib // block) * block, top)
        if new != current:
            try:
                await asyncio.wait_for(self._call("vm.resize", self.api.resize(desired_ram=new * MIB)), timeout)
            except TimeoutError:
                raise DeadlineExceeded(f"cloud-hypervisor vm.resize to {new} MiB: no answer within "
                                       f"{timeout:.0f}s") from None
        return new

    def _require_balloon(self) -> None:
        if "balloon" not in self.memory_mechanisms():
            raise FailedPrecondition("VM has no balloon device")

    async def balloon(self, target_bytes: int) -> None:
        """Leave the guest ``target_bytes`` of usable RAM: the balloon takes the rest."""
        self._require_balloon()
        mem = await self.memory_info()
        total = mem.boot + mem.plugged
        if not 0 < target_bytes <= total:
            raise InvalidArgument(f"balloon target must be 1..{total} bytes, not {target_bytes}")
        await self._call("vm.resize", self.api.resize(desired_balloon=total - target_bytes))

    async def balloon_info(self) -> BalloonInfo:
        self._require_balloon()
        info = await self._call("vm.info", self.api.info())
        actual = _int(info, "memory_actual_size")
        return BalloonInfo(actual_bytes=actual)
