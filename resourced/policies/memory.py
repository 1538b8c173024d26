"""The memory policy: offline VMs give memory back while the node is under memory pressure and
get it back once the pressure is gone (the seeds' resource agent shrinking and expanding the
Kata VMs), with optional Koordinator-style eviction. Configuration: ``[memory]``
(:mod:`resourced.policies.memory_config`); samples: :mod:`resourced.policies.memory_sample`.

Every sample (pure, :func:`decide`):

* **pressure** = available < ``low_watermark_percent`` of the node's memory, or host memory PSI
  "some" avg10 ≥ ``psi_some_avg10``. The deficit (low watermark − available, at least one step)
  is taken from the managed sandboxes whose guests have the most memory available first, one
  ``step_mib`` each, never below the sandbox's floor (guest used + reserve, from its shim) nor the
  policy's ``min_mib``.
* **relaxed** = available > ``high_watermark_percent`` and PSI below half its threshold: sandboxes
  the policy shrank grow back towards the size they had before (their *baseline*), one step each,
  only while the node stays above the high watermark (the headroom is shared out). Between the
  watermarks nothing moves (hysteresis).
* **bounds**: a sandbox above the policy's maximum for it now (``max_mib``, per sandbox
  ``[memory.sandbox.<prefix>]``, the time-of-day ``[[memory.window]]``) is stepped down to it,
  pressure or not; a window's ``min_mib`` raises the floor the policy keeps to.
* a sandbox being resized, or resized less than ``cooldown_s`` ago, is left alone.
* **eviction** (``[memory.evict]``, off by default): node memory used ≥ ``threshold_percent`` →
  one EvictPod (the lowest-priority offline pod, through CRI), then nothing for ``cooldown_s``.

The baseline of a sandbox is its target when first seen; a target the policy did not ask for (an
operator's ``kata-colo-ctl mem``, a container Update) becomes the new baseline.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import ClassVar

from resourced.policies.base import Action, EvictPod, Features, NodeSample
from resourced.policies.memory_config import MIB, MemoryConfig, parse_config
from resourced.policyfile import Table


@dataclass(frozen=True)
class HostMemory:
    total: int
    available: int
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None
    source: str = "/proc/meminfo"

    @property
    def used_percent(self) -> float:
        return 100.0 * (1.0 - self.available / self.total) if self.total > 0 else 0.0


@dataclass(frozen=True)
class SandboxMemory:
    """One sandbox as its shim shows it (GET /colo/memory), bytes."""

    id: str
    target: int
    actual: int
    floor: int
    max: int
    guest_available: int | None = None
    resizing: bool = False
    offline: bool = True
    seen_at: float = 0.0        # monotonic time the shim answered


@dataclass(frozen=True)
class MemorySample:
    t: float                    # monotonic seconds
    clock: dt.time              # local time of day (windows)
    host: HostMemory
    sandboxes: tuple[SandboxMemory, ...] = ()


@dataclass(frozen=True)
class ResizeMemory(Action):
    """PUT /colo/memory on the sandbox's shim (run by the daemon in the background)."""

    sandbox_id: str
    target_bytes: int


@dataclass
class MemoryState:
    baseline: dict[str, int] = field(default_factory=dict)   # the size to grow back to
    asked: dict[str, int] = field(default_factory=dict)      # what the policy last set (or saw)
    changed_at: dict[str, float] = field(default_factory=dict)
    inflight: set[str] = field(default_factory=set)          # resizes the daemon is running
    seen: dict[str, int] = field(default_factory=dict)       # the target in the latest view
    last_evict: float | None = None
    pressure: bool = False
    pressure_since: float | None = None
    relaxed: bool = False


def _mib(v: int) -> str:
    return f"{v // MIB} MiB"


def pressure_of(h: HostMemory, cfg: MemoryConfig) -> tuple[bool, bool, str]:
    """(pressure, relaxed, why)."""
    low = h.total * cfg.low_watermark_percent / 100.0
    high = h.total * cfg.high_watermark_percent / 100.0
    psi = h.psi_some_avg10 if h.psi_some_avg10 is not None else 0.0
    psi_hot = cfg.psi_some_avg10 > 0 and psi >= cfg.psi_some_avg10
    psi_calm = cfg.psi_some_avg10 <= 0 or psi < cfg.psi_some_avg10 / 2
    why = (f"available {_mib(h.available)} of {_mib(h.total)} (low {cfg.low_watermark_percent:g}% "
           f"high {cfg.high_watermark_percent:g}%), PSI some avg10 {psi:.1f}")
    return h.available < low or psi_hot, h.available > high and psi_calm, why


def observe(s: SandboxMemory, st: MemoryState) -> None:
    """Track baselines: a first sighting, or a target the policy did not set (seen after the
    policy's last resize of it finished, and not while one runs)."""
    if s.id not in st.asked:
        st.baseline[s.id] = st.asked[s.id] = st.seen[s.id] = s.target
        return
    st.seen[s.id] = s.target
    if s.id in st.inflight or s.resizing or s.seen_at <= st.changed_at.get(s.id, float("-inf")):
        return
    if s.target != st.asked[s.id]:
        st.baseline[s.id] = st.asked[s.id] = s.target


def decide(sample: MemorySample, cfg: MemoryConfig, st: MemoryState) -> list[Action]:
    if not cfg.enabled:
        return []
    h = sample.host
    managed = [s for s in sample.sandboxes if s.offline or cfg.sandboxes == "all"]
    for s in managed:
        observe(s, st)
    for gone in set(st.asked) - {s.id for s in sample.sandboxes}:
        for d in (st.asked, st.baseline, st.changed_at, st.seen):
            d.pop(gone, None)
        st.inflight.discard(gone)
    pressure, relaxed, why = pressure_of(h, cfg)
    if pressure and not st.pressure:
        st.pressure_since = sample.t
    if not pressure:
        st.pressure_since = None
    st.pressure, st.relaxed = pressure, relaxed
    step = cfg.step_mib * MIB
    out: list[Action] = []

    def ready(s: SandboxMemory) -> bool:
        last = st.changed_at.get(s.id)
        return (not s.resizing and s.id not in st.inflight
                and (last is None or sample.t - last >= cfg.cooldown_s))

    def limits(s: SandboxMemory) -> tuple[int, int]:
        b = cfg.bounds(s.id, sample.clock)
        lo = max(s.floor, b.min_mib * MIB)
        hi = min(s.max, b.max_mib * MIB) if b.max_mib else s.max
        return lo, max(lo, hi)

    def resize(s: SandboxMemory, new: int, reason: str) -> None:
        st.asked[s.id] = new
        st.changed_at[s.id] = sample.t
        st.inflight.add(s.id)
        out.append(ResizeMemory(reason, s.id, new))

    touched: set[str] = set()
    for s in managed:  # bounds first: a window or a cap applies whatever the pressure
        lo, hi = limits(s)
        if s.target > hi and ready(s):
            resize(s, max(hi, s.target - step), f"{s.id[:12]}: above its maximum {_mib(hi)} now → step down")
            touched.add(s.id)
    if pressure:
        deficit = max(step, int(h.total * cfg.low_watermark_percent / 100.0) - h.available)
        order = sorted((s for s in managed if s.id not in touched and ready(s)),
                       key=lambda s: (-(s.guest_available or 0), s.id))
        for s in order:
            if deficit <= 0:
                break
            lo, _ = limits(s)
            new = max(lo, s.target - step)
            if new < s.target:
                resize(s, new, f"pressure: {why} → {s.id[:12]} {_mib(s.target)} → {_mib(new)}")
                deficit -= s.target - new
    elif relaxed:
        headroom = h.available - int(h.total * cfg.high_watermark_percent / 100.0)
        order = sorted((s for s in managed if s.id not in touched and ready(s)),
                       key=lambda s: (s.target - st.baseline.get(s.id, s.target), s.id))
        for s in order:
            _, hi = limits(s)
            want = min(st.baseline.get(s.id, s.target), hi)
            grow = min(step, want - s.target, headroom)
            if grow >= min(step, want - s.target) > 0:
                resize(s, s.target + grow, f"relaxed: {why} → {s.id[:12]} {_mib(s.target)} → "
                                           f"{_mib(s.target + grow)} (baseline {_mib(want)})")
                headroom -= grow
    ev = cfg.evict
    if ev.enabled and h.used_percent >= ev.threshold_percent and (
            st.last_evict is None or sample.t - st.last_evict >= ev.cooldown_s):
        st.last_evict = sample.t
        out.append(EvictPod(f"node memory used {h.used_percent:.1f}% >= {ev.threshold_percent:g}%"))
    return out


@dataclass
class MemoryPolicy:
    name: ClassVar[str] = "memory"
    config: MemoryConfig = field(default_factory=MemoryConfig)
    state: MemoryState = field(default_factory=MemoryState)
    last: MemorySample | None = None

    @classmethod
    def from_table(cls, table: Table) -> MemoryPolicy:
        return cls(parse_config(table))

    def setup(self, features: Features, online: list[str], offline: list[str]) -> list[Action]:
        return []

    def decide(self, sample: NodeSample) -> list[Action]:
        mem = sample.extra.get("memory") if isinstance(sample.extra, dict) else None
        if not self.config.enabled or not isinstance(mem, MemorySample):
            return []
        self.last = mem
        return decide(mem, self.config, self.state)

    def resized(self, sandbox_id: str, reached: int | None, at: float) -> None:
        """The daemon's report of a resize it ran (finished at monotonic ``at``): the size the
        sandbox reached is the policy's (None: unknown, the next fresh view tells)."""
        st = self.state
        st.inflight.discard(sandbox_id)
        if sandbox_id in st.asked:
            st.changed_at[sandbox_id] = max(at, st.changed_at.get(sandbox_id, at))
            # refused or failed without a size: it kept what the last view showed
            st.asked[sandbox_id] = reached if reached is not None else st.seen.get(sandbox_id, st.asked[sandbox_id])

    def release(self, online: list[str], offline: list[str], node_cpus: tuple[int, ...]) -> list[Action]:
        return []  # the VMs keep their size: the next policy run (or an operator) decides

    def gauges(self) -> dict[str, float]:
        m = self.last
        if m is None:
            return {}
        return {"memory_node_total_bytes": float(m.host.total), "memory_node_available_bytes": float(m.host.available),
                "memory_node_psi_some_avg10": float(m.host.psi_some_avg10 or 0.0),
                "memory_pressure": 1.0 if self.state.pressure else 0.0,
                "memory_sandboxes_managed": float(sum(1 for s in m.sandboxes
                                                      if s.offline or self.config.sandboxes == "all"))}

    def sandbox_gauges(self) -> dict[str, dict[str, float]]:
        """Per sandbox: target, actual, floor, baseline (``kata_colo_resourced_memory_sandbox_bytes``)."""
        m = self.last
        if m is None:
            return {}
        return {s.id: {"target": float(s.target), "actual": float(s.actual), "floor": float(s.floor),
                       "baseline": float(self.state.baseline.get(s.id, s.target))} for s in m.sandboxes}
