"""Sizing rules of memory elasticity, pure (no I/O): the limits a target must respect and the
order in which the mechanisms move towards it.

Limits (bytes, :func:`limits`):

- ``max``: boot RAM + everything the VM can hot-plug (``MemoryInfo.max``); without hotplug, what
  the VM has now (a balloon can only give back what it took).
- ``lowest``: what the mechanisms can reach at all — ``min_mib`` with a balloon; without one,
  virtio-mem can unplug down to boot RAM and DIMMs are not unplugged (the guest rarely can
  offline them), so the current size.
- ``floor`` = max(lowest, ``min_mib``, guest used + ``reserve_mib``) where *guest used* is
  ``usable − available`` (what the guest could not give back now, its kernel's own overhead
  included), capped at ``usable`` (a floor never forbids growing). Unknown guest numbers → the
  floor is ``usable``: no shrink without knowing what the guest needs.

Order (:func:`steps`): growing deflates the balloon first (memory the guest can use at once),
then hot-plugs; shrinking unplugs virtio-mem first (whole blocks go back to the host), then
inflates the balloon for the rest. DIMMs only grow (a shrink below them is the balloon's).
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import DeadlineExceeded, InvalidArgument
from hypervisor.base import MemoryInfo

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    floor: int
    max: int
    lowest: int
    used: int | None  # the guest's used memory estimate; None = unknown
    source: str       # where the guest's numbers came from: agent | balloon | none


class MemoryLimitError(InvalidArgument):
    """A target outside [floor, max]; carries the limits for the answer."""

    def __init__(self, message: str, *, target: int, lim: Limits) -> None:
        super().__init__(message)
        self.target = target
        self.limits = lim


class MemoryTimeout(DeadlineExceeded):
    """The guest did not reach the target in time; ``actual`` is what it reached (the VM keeps it)."""

    def __init__(self, message: str, *, target: int, actual: int) -> None:
        super().__init__(message)
        self.target = target
        self.actual = actual


def current_total(info: MemoryInfo) -> int:
    return info.boot + info.plugged


def limits(info: MemoryInfo, mechanisms: tuple[str, ...], available: int | None, *,
           reserve_mib: int, min_mib: int, source: str = "agent") -> Limits:
    usable = info.usable
    hotplug = "virtio-mem" in mechanisms or "dimm" in mechanisms
    top = max(info.max, current_total(info)) if hotplug else current_total(info)
    if "balloon" in mechanisms:
        lowest = min_mib * MIB
    elif "virtio-mem" in mechanisms:
        lowest = info.boot
    else:
        lowest = usable
    lowest = min(lowest, usable)
    if available is None:
        return Limits(floor=usable, max=top, lowest=lowest, used=None, source="none")
    avail = min(max(0, available), usable)  # the guest's word, bounded by what it has
    used = usable - avail
    floor = max(lowest, min_mib * MIB, used + reserve_mib * MIB)
    return Limits(floor=min(floor, usable), max=top, lowest=lowest, used=used, source=source)


def align(target: int) -> int:
    """Targets are whole MiB (rounded up)."""
    return -(-target // MIB) * MIB


def check(target: int, usable: int, lim: Limits) -> None:
    """MemoryLimitError unless ``target`` is within the limits (growing ignores the floor)."""
    if target > lim.max:
        raise MemoryLimitError(f"memory target {target} bytes is over the maximum {lim.max} bytes "
                               f"(floor {lim.floor})", target=target, lim=lim)
    if target < usable and target < lim.floor:
        why = ("the guest's used memory is unknown" if lim.used is None
               else f"guest used {lim.used} bytes + reserve")
        raise MemoryLimitError(f"memory target {target} bytes is under the floor {lim.floor} bytes "
                               f"({why}; maximum {lim.max})", target=target, lim=lim)


@dataclass(frozen=True)
class Step:
    """One action: ``kind`` is ``balloon`` (usable RAM → ``value`` bytes) or ``hotplug`` (boot +
    plugged → ``value`` bytes, rounded by the driver to its blocks)."""

    kind: str
    value: int


def steps(target: int, info: MemoryInfo, mechanisms: tuple[str, ...]) -> list[Step]:
    """The actions that bring the VM from ``info`` to ``target`` (see the module docstring).
    A balloon step after a hotplug step is re-aimed by the caller at the size the hotplug
    reached (:func:`balloon_after`)."""
    total = current_total(info)
    balloon = "balloon" in mechanisms
    out: list[Step] = []
    if target >= info.usable:  # grow
        if balloon and info.ballooned:
            out.append(Step("balloon", min(target, total)))
        if target > total and ("virtio-mem" in mechanisms or "dimm" in mechanisms):
            out.append(Step("hotplug", target))
            if balloon:
                out.append(Step("balloon", target))  # a DIMM/block rounding above the target
        return out
    if "virtio-mem" in mechanisms and total > info.boot:
        out.append(Step("hotplug", max(target, info.boot)))
    if balloon:
        out.append(Step("balloon", target))
    return out


def balloon_after(target: int, total: int) -> int:
    """The balloon value once the VM has ``total`` bytes: the target, never above the total."""
    return min(target, total)
