"""The ``[memory]`` table of the policy file (resourced.policies.memory), validated with file:line
errors, and the per-sandbox bounds it gives at a time of day.

::

    [memory]
    enabled = true
    node_cgroup = ""              # "" = the host (/proc/meminfo, /proc/pressure/memory); a memory
                                  # cgroup = a node carved out of a host (its limit and usage)
    sandboxes = "offline"         # which sandboxes: "offline" (VMM in an offline tier) | "all"
    state_root = "/run/kata-colo/sbs"
    sample_interval_ms = 1000     # how often the sandboxes' memory is read (their shims)
    low_watermark_percent = 10    # available below this % of the node's memory: pressure, shrink
    high_watermark_percent = 20   # available above it (and PSI calm): grow back
    psi_some_avg10 = 20           # host memory PSI "some" avg10 at/above this: pressure (0 = off)
    step_mib = 256                # per sandbox and decision
    cooldown_s = 10               # between two resizes of one sandbox
    min_mib = 0                   # no sandbox below (besides its own floor)
    max_mib = 0                   # none above (0 = its own maximum)

    [memory.sandbox."<id or id prefix>"]     # per-sandbox bounds
    min_mib = 512
    max_mib = 2048

    [[memory.window]]             # time-of-day windows (local time, may wrap midnight)
    start = "09:00"
    end = "21:00"
    max_mib = 1024                # offline VMs capped while online traffic peaks

    [memory.evict]                # Koordinator-style: the lowest-priority offline pod goes
    enabled = false
    threshold_percent = 70        # node memory used at/above this
    cooldown_s = 4
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from resourced.policyfile import Table

MIB = 1 << 20
MAX_MIB = 1 << 24


@dataclass(frozen=True)
class Bounds:
    min_mib: int = 0
    max_mib: int = 0  # 0 = no cap


@dataclass(frozen=True)
class Window:
    start: dt.time
    end: dt.time
    min_mib: int = 0
    max_mib: int = 0

    def contains(self, now: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end  # wraps midnight


@dataclass(frozen=True)
class EvictConfig:
    enabled: bool = False
    threshold_percent: float = 70.0
    cooldown_s: float = 4.0


@dataclass(frozen=True)
class MemoryConfig:
    enabled: bool = True
    node_cgroup: str = ""
    sandboxes: str = "offline"
    state_root: str = "/run/kata-colo/sbs"
    sample_interval_ms: float = 1000.0
    low_watermark_percent: float = 10.0
    high_watermark_percent: float = 20.0
    psi_some_avg10: float = 20.0
    step_mib: int = 256
    cooldown_s: float = 10.0
    min_mib: int = 0
    max_mib: int = 0
    per_sandbox: dict[str, Bounds] = field(default_factory=dict)
    windows: tuple[Window, ...] = ()
    evict: EvictConfig = EvictConfig()

    def bounds(self, sandbox_id: str, now: dt.time) -> Bounds:
        """The policy's bounds for one sandbox now: the table's, narrowed by the longest matching
        ``[memory.sandbox.<prefix>]`` and by every window that contains ``now`` (0 = none)."""
        lo, hi = self.min_mib, self.max_mib
        match = max((p for p in self.per_sandbox if sandbox_id.startswith(p)), key=len, default=None)
        if match is not None:
            b = self.per_sandbox[match]
            lo, hi = b.min_mib or lo, b.max_mib or hi
        for w in self.windows:
            if w.contains(now):
                lo = max(lo, w.min_mib)
                hi = min(hi, w.max_mib) if hi and w.max_mib else (hi or w.max_mib)
        return Bounds(lo, hi)


def _clock(t: Table, key: str) -> dt.time:
    text = t.string(key, "")
    try:
        return dt.time.fromisoformat(text)
    except ValueError:
        raise t.error(key, f"must be a time of day like \"09:00\", not {text!r}") from None


def _bounds(t: Table) -> tuple[int, int]:
    lo = int(t.number("min_mib", 0, 0, MAX_MIB, integer=True))
    hi = int(t.number("max_mib", 0, 0, MAX_MIB, integer=True))
    if hi and lo > hi:
        raise t.error("min_mib", f"min_mib {lo} is above max_mib {hi}")
    return lo, hi


def parse_config(t: Table) -> MemoryConfig:
    enabled = t.boolean("enabled", True)
    node = t.string("node_cgroup", "").strip("/")
    if ".." in node.split("/"):
        raise t.error("node_cgroup", f"bad cgroup path {node!r}")
    sandboxes = t.choice("sandboxes", "offline", ("offline", "all"))
    root = t.string("state_root", "/run/kata-colo/sbs")
    if not root.startswith("/"):
        raise t.error("state_root", f"must be an absolute path, not {root!r}")
    interval = float(t.number("sample_interval_ms", 1000.0, 100, 600_000))
    low = float(t.number("low_watermark_percent", 10.0, 0, 100))
    high = float(t.number("high_watermark_percent", 20.0, 0, 100))
    if high < low:
        raise t.error("high_watermark_percent", f"must be at least low_watermark_percent ({low:g})")
    psi = float(t.number("psi_some_avg10", 20.0, 0, 100))
    step = int(t.number("step_mib", 256, 1, MAX_MIB, integer=True))
    cooldown = float(t.number("cooldown_s", 10.0, 0, 86400))
    lo, hi = _bounds(t)
    per: dict[str, Bounds] = {}
    sb = t.sub("sandbox")
    for prefix in sb.data:
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise sb.error(str(prefix), "must be a sandbox id or id prefix")
        one = sb.sub(prefix)
        per[prefix] = Bounds(*_bounds(one))
        one.done()
    sb.done()
    windows: list[Window] = []
    raw = t.data.get("window", [])
    t._seen.add("window")
    if not isinstance(raw, list):
        raise t.error("window", "must be an array of tables ([[memory.window]])")
    for i, w in enumerate(raw):
        wt = Table(w, (*t.path, f"window#{i + 1}"), t.loc)
        start, end = _clock(wt, "start"), _clock(wt, "end")
        if start == end:
            raise wt.error("end", f"window {i + 1}: start and end are both {start}")
        wlo, whi = _bounds(wt)
        if not wlo and not whi:
            raise wt.error("max_mib", f"window {i + 1}: give min_mib and/or max_mib")
        wt.done()
        windows.append(Window(start, end, wlo, whi))
    e = t.sub("evict")
    evict = EvictConfig(enabled=e.boolean("enabled", False),
                        threshold_percent=float(e.number("threshold_percent", 70.0, 1, 100)),
                        cooldown_s=float(e.number("cooldown_s", 4.0, 0, 86400)))
    e.done()
    t.done()
    return MemoryConfig(enabled=enabled, node_cgroup=node, sandboxes=sandboxes, state_root=root,
                        sample_interval_ms=interval, low_watermark_percent=low, high_watermark_percent=high,
                        psi_some_avg10=psi, step_mib=step, cooldown_s=cooldown, min_mib=lo, max_mib=hi,
                        per_sandbox=per, windows=tuple(windows), evict=evict)
