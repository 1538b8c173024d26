"""Memory elasticity as a sandbox resource: it owns the VM's memory state (the target, the last
resize, the guest's numbers) and moves the VM towards a target with the hypervisor's
:class:`~hypervisor.base.MemoryControl` mechanisms (:mod:`shim.resources.memory.plan`).

Applies to every sandbox whose driver has MemoryControl. It makes no host object (DIMM backends
and the virtio-mem region live inside the VMM and go with it), so its journal record is only
informative and recovery has nothing to undo. After boot it reads the VM's size (the first
target), starts the balloon's statistics polling and tells the guest (``resources.json``).

:meth:`MemoryResource.resize` (one at a time): limits from the guest's memory (the agent's
/proc/meminfo, else the balloon statistics) → MemoryLimitError outside [floor, max] → the steps,
each waited for within ``[colo.memory] resize_timeout`` in total → the guest is told the new
state. A guest that does not give memory back (or take it) in time: MemoryTimeout with the size
reached, which becomes the target; the VM keeps running. A virtio-mem unplug the guest cannot
complete is finished by the balloon when there is one (the order Dragonball uses).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.errors import DeadlineExceeded, FailedPrecondition, KataColoError
from hypervisor.base import BalloonInfo, MemoryControl, MemoryInfo
from shim.resources.manager import ResourceContext
from shim.resources.memory import plan
from shim.resources.memory.plan import MIB, Limits, MemoryLimitError, MemoryTimeout

log = logging.getLogger(__name__)

GUEST_TIMEOUT = 5.0
BALLOON_POLL = 0.25
BALLOON_TOLERANCE = MIB  # the guest balloon moves in pages; "reached" within 1 MiB
STATS_FRESH_SECONDS = 10.0
MAX_GUEST_BYTES = 1 << 50
GUEST_KEYS = ("total_bytes", "free_bytes", "available_bytes", "cached_bytes", "block_size_bytes",
              "offline_blocks")


@dataclass
class ResizeResult:
    target: int
    actual: int
    floor: int
    max: int
    seconds: float
    mechanisms: tuple[str, ...]
    steps: list[str] = field(default_factory=list)
    timed_out: bool = False
    requested: int = 0
    at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"target_bytes": self.target, "actual_bytes": self.actual, "requested_bytes": self.requested,
                "floor_bytes": self.floor, "max_bytes": self.max, "seconds": round(self.seconds, 3),
                "mechanisms": list(self.mechanisms), "steps": list(self.steps), "timed_out": self.timed_out}


def _bounded(doc: dict[str, Any]) -> dict[str, int]:
    """The guest's numbers, each a non-negative int capped (the guest is untrusted)."""
    out: dict[str, int] = {}
    for key in GUEST_KEYS:
        value = doc.get(key, 0)
        out[key] = min(max(int(value), 0), MAX_GUEST_BYTES) if isinstance(value, int) else 0
    return out


class MemoryResource:
    kind: ClassVar[str] = "memory"

    def __init__(self, sandbox_id: str, settings: Any) -> None:
        self.sandbox_id = sandbox_id
        self.settings = settings  # shim.config.MemoryConfig
        self.hv: Any = None
        self.agent: Any = None
        self.target = 0
        self.guest: dict[str, int] = {}
        self.guest_at = 0.0
        self.last: ResizeResult | None = None
        self.last_error = ""
        self.counts = {"ok": 0, "timeout": 0, "refused": 0, "failed": 0}
        self.in_progress: int | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> MemoryResource | None:
        if not isinstance(ctx.hypervisor, MemoryControl):
            return None
        return cls(ctx.sandbox_id, ctx.config.colo.memory)

    def record(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "target_bytes": self.target}

    async def before_boot(self, ctx: ResourceContext) -> None:
        return None

    async def after_boot(self, ctx: ResourceContext) -> None:
        self.hv, self.agent = ctx.hypervisor, ctx.agent
        info = await self.hv.memory_info()
        self.target = info.usable
        with contextlib.suppress(FailedPrecondition):
            await self.hv.balloon_info()  # starts the guest statistics polling
        available, source = await self.guest_available(fresh=True)
        await self._tell_guest(info, self._limits(info, available, source))

    async def teardown(self) -> None:
        self.hv = self.agent = None

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        return None  # nothing outside the VMM

    # -- reading ------------------------------------------------------------------------------

    def _require(self) -> Any:
        if self.hv is None:
            raise FailedPrecondition(f"sandbox {self.sandbox_id}: memory control is not ready")
        return self.hv

    def mechanisms(self) -> tuple[str, ...]:
        return tuple(self._require().memory_mechanisms())

    async def _balloon(self) -> BalloonInfo | None:
        try:
            info: BalloonInfo = await self._require().balloon_info()
        except FailedPrecondition:
            return None
        return info

    async def guest_available(self, fresh: bool = True) -> tuple[int | None, str]:
        """The guest's available memory and where it came from (the agent, asked now when
        ``fresh``; else the balloon statistics; else the last answer while it is recent)."""
        if fresh and self.agent is not None:
            try:
                doc = await asyncio.wait_for(self.agent.guest_memory(), GUEST_TIMEOUT)
            except (KataColoError, TimeoutError) as exc:
                log.info("sandbox %s: guest memory from the agent: %s", self.sandbox_id, exc or "timeout")
            else:
                self.guest, self.guest_at = _bounded(doc), time.monotonic()
                return self.guest["available_bytes"], "agent"
        try:
            balloon = await self._balloon()
        except KataColoError:
            balloon = None
        if balloon is not None and "stat-available-memory" in balloon.stats:
            return min(balloon.stats["stat-available-memory"], MAX_GUEST_BYTES), "balloon"
        if self.guest and time.monotonic() - self.guest_at < STATS_FRESH_SECONDS:
            return self.guest["available_bytes"], "agent"
        return None, "none"

    def _limits(self, info: MemoryInfo, available: int | None, source: str) -> Limits:
        return plan.limits(info, self.mechanisms(), available, reserve_mib=self.settings.reserve_mib,
                           min_mib=self.settings.min_mib, source=source)

    async def limits(self, fresh: bool = True) -> tuple[MemoryInfo, Limits]:
        info: MemoryInfo = await self._require().memory_info()
        available, source = await self.guest_available(fresh)
        return info, self._limits(info, available, source)

    # -- resizing -----------------------------------------------------------------------------

    async def resize(self, target: int) -> ResizeResult:
        """Bring the VM to ``target`` bytes (rounded up to MiB); see the module docstring."""
        async with self._lock:
            started = time.monotonic()
            hv = self._require()
            info, lim = await self.limits(fresh=True)
            wanted = plan.align(int(target))
            try:
                plan.check(wanted, info.usable, lim)
            except MemoryLimitError:
                self.counts["refused"] += 1
                raise
            self.in_progress = wanted
            mechanisms = self.mechanisms()
            result = ResizeResult(target=wanted, actual=info.usable, floor=lim.floor, max=lim.max, seconds=0.0,
                                  mechanisms=mechanisms, requested=int(target), at=time.time())
            try:
                await self._run_steps(hv, wanted, info, mechanisms, started, result)
            except MemoryTimeout as exc:
                self.counts["timeout"] += 1
                self.last_error = str(exc)
                await self._settle(result, started, timed_out=True)
                exc.actual = result.actual
                raise
            except BaseException as exc:
                self.counts["failed"] += 1
                self.last_error = str(exc)
                with contextlib.suppress(KataColoError, TimeoutError):
                    await self._settle(result, started, timed_out=True)
                raise
            finally:
                self.in_progress = None
            self.counts["ok"] += 1
            self.last_error = ""
            await self._settle(result, started, timed_out=False)
            log.info("sandbox %s: memory %s → %d MiB in %.2fs (%s)", self.sandbox_id,
                     "grown" if wanted > info.usable else "shrunk", result.actual // MIB, result.seconds,
                     ", ".join(result.steps) or "nothing to do")
            return result

    async def _run_steps(self, hv: Any, wanted: int, info: MemoryInfo, mechanisms: tuple[str, ...],
                         started: float, result: ResizeResult) -> None:
        deadline = started + self.settings.resize_timeout
        total = plan.current_total(info)
        todo = plan.steps(wanted, info, mechanisms)
        for i, step in enumerate(todo):
            remaining = max(0.5, deadline - time.monotonic())
            if step.kind == "hotplug":
                if wanted < info.usable and any(s.kind == "balloon" for s in todo[i + 1:]):
                    remaining /= 2  # an unplug the guest cannot finish leaves time for the balloon
                try:
                    total = await hv.resize_memory(step.value // MIB, timeout=remaining) * MIB
                    result.steps.append(f"hotplug {total // MIB} MiB")
                except DeadlineExceeded as exc:
                    now = await hv.memory_info()
                    total = plan.current_total(now)
                    result.steps.append(f"hotplug stopped at {total // MIB} MiB")
                    if "balloon" not in mechanisms or wanted > total:
                        raise MemoryTimeout(str(exc), target=wanted, actual=now.usable) from None
                    log.info("sandbox %s: %s; the balloon takes the rest", self.sandbox_id, exc)
            else:
                value = plan.balloon_after(step.value, total)
                if value == total and not (await hv.memory_info()).ballooned:
                    continue  # nothing inflated and nothing to inflate
                await hv.balloon(value)
                result.steps.append(f"balloon {value // MIB} MiB")
                await self._wait_balloon(hv, value, deadline, wanted)

    async def _wait_balloon(self, hv: Any, value: int, deadline: float, wanted: int) -> None:
        deadline = max(deadline, time.monotonic() + 0.5)
        while True:
            actual = (await hv.balloon_info()).actual_bytes
            if abs(actual - value) <= BALLOON_TOLERANCE:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(BALLOON_POLL)
        with contextlib.suppress(KataColoError):
            await hv.balloon(actual)  # withdraw: the guest keeps what it reached
        how = "gave memory back only down to" if value < actual else "took memory back only up to"
        raise MemoryTimeout(f"memory: the guest {how} {actual // MIB} MiB of the {value // MIB} MiB asked "
                            f"within {self.settings.resize_timeout:.0f}s (the VM keeps running with "
                            f"{actual // MIB} MiB)", target=wanted, actual=actual)

    async def _settle(self, result: ResizeResult, started: float, *, timed_out: bool) -> None:
        info = await self._require().memory_info()
        result.actual = info.usable
        result.timed_out = timed_out
        result.seconds = time.monotonic() - started
        self.target = result.target if not timed_out else info.usable
        self.last = result
        available, source = await self.guest_available(fresh=True)  # the floor at the new size
        await self._tell_guest(info, self._limits(info, available, source))

    async def _tell_guest(self, info: MemoryInfo, lim: Limits) -> None:
        """resources.json in the guest follows (best effort: the resize itself is done)."""
        if self.agent is None:
            return
        try:
            doc = await asyncio.wait_for(self.agent.set_memory(
                usable=info.usable, target=self.target, maximum=lim.max, floor=lim.floor,
                mechanisms=self.mechanisms()), GUEST_TIMEOUT)
        except (KataColoError, TimeoutError) as exc:
            log.warning("sandbox %s: telling the guest its memory failed: %s", self.sandbox_id, exc or "timeout")
            return
        self.guest, self.guest_at = _bounded(doc), time.monotonic()

    # -- views --------------------------------------------------------------------------------

    async def view(self) -> dict[str, Any]:
        """The memory state for GET /colo/sandbox and the metrics: from the VMM and the last
        guest numbers only (the guest is not asked; a hung guest cannot stall it)."""
        hv = self._require()
        info: MemoryInfo = await hv.memory_info()
        available, source = await self.guest_available(fresh=False)
        lim = self._limits(info, available, source)
        balloon = None
        with contextlib.suppress(KataColoError):
            balloon = await self._balloon()
        doc: dict[str, Any] = {
            "boot_bytes": info.boot, "plugged_bytes": info.plugged, "ballooned_bytes": info.ballooned,
            "max_bytes": lim.max, "usable_bytes": info.usable, "actual_bytes": info.usable,
            "target_bytes": self.target, "floor_bytes": lim.floor, "block_bytes": info.block,
            "mechanisms": list(self.mechanisms()), "resizing_to": self.in_progress,
            "guest": {**self.guest, "available_bytes": available, "source": source, "used_bytes": lim.used},
            "resizes": dict(self.counts), "last": self.last.to_dict() if self.last else None,
            "last_error": self.last_error or None}
        if balloon is not None:
            doc["balloon"] = {"actual_bytes": balloon.actual_bytes, "stats": dict(balloon.stats)}
        return doc
