"""Co-location QoS configuration model: `[colo.root]` and `[colo.priorities.<name>]` tables →
frozen dataclasses, validated (ConfigError on anything wrong).

Knob keys (all optional; an absent knob is left at the kernel default / inherited value):

=============== ============================ =========================================
key             v1 file                      v2 file
=============== ============================ =========================================
cpu_shares      cpu.shares (2..262144)       cpu.weight (converted, runc formula)
cpu_weight      cpu.shares (converted back)  cpu.weight (1..10000)
cpu_idle        cpu.idle                     cpu.idle
cfs_quota_us    cpu.cfs_quota_us (-1 = max)  cpu.max "QUOTA PERIOD"
cfs_period_us   cpu.cfs_period_us            cpu.max
cfs_burst_us    cpu.cfs_burst_us             cpu.max.burst (clamped to ≤ quota)
cpuset          cpuset.cpus ("0-1,3")        cpuset.cpus
pin             (priorities only) pin each vCPU thread to one CPU of the priority's cpuset
sched_idle      (priorities only) SCHED_IDLE for each vCPU thread (per TID)
=============== ============================ =========================================

``cpu_idle = true`` on a kernel without cpu.idle (before 5.15) degrades, for a priority, to
``sched_idle`` on its vCPU threads (the manager decides; see manager.py). ``[colo.vmm]`` holds
the knobs of each sandbox's ``vmm`` group (every VMM thread that is not a vCPU).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

SHARES_MIN, SHARES_MAX = 2, 262144
WEIGHT_MIN, WEIGHT_MAX = 1, 10000
PERIOD_MIN, PERIOD_MAX = 1000, 1_000_000
QUOTA_MIN = 1000
DEFAULT_PERIOD = 100_000
_PRIORITY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_CGROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_KNOB_KEYS = ("cpu_shares", "cpu_weight", "cpu_idle", "cfs_quota_us", "cfs_period_us",
              "cfs_burst_us", "cpuset")


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares → v2 cpu.weight (runc: 1 + ((shares - 2) * 9999) / 262142)."""
    if not SHARES_MIN <= shares <= SHARES_MAX:
        raise ConfigError(f"cpu shares {shares} out of range {SHARES_MIN}..{SHARES_MAX}")
    return 1 + ((shares - 2) * 9999) // 262142


def weight_to_shares(weight: int) -> int:
    """Inverse of :func:`shares_to_weight` (smallest shares mapping to ``weight``)."""
    if not WEIGHT_MIN <= weight <= WEIGHT_MAX:
        raise ConfigError(f"cpu weight {weight} out of range {WEIGHT_MIN}..{WEIGHT_MAX}")
    # ceil((weight - 1) * 262142 / 9999) + 2 is the smallest shares with that weight.
    return 2 + -(-((weight - 1) * 262142) // 9999)


def parse_cpuset(text: str) -> tuple[int, ...]:
    """"0-2,5" → (0, 1, 2, 5). ConfigError on garbage, reversed ranges or an empty list."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"bad cpuset {text!r}: expected a list like '0-1,3'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo or hi >= 4096:
            raise ConfigError(f"bad cpuset {text!r}: range {part!r}")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def format_cpuset(cpus: tuple[int, ...] | list[int]) -> str:
    """(0, 1, 2, 5) → "0-2,5"."""
    out: list[str] = []
    items = sorted(set(cpus))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


@dataclass(frozen=True)
class CpuKnobs:
    """CPU knobs of one group; None = do not touch (inherit / kernel default)."""

    cpu_shares: int | None = None
    cpu_weight: int | None = None
    cpu_idle: bool | None = None
    cfs_quota_us: int | None = None
    cfs_period_us: int | None = None
    cfs_burst_us: int | None = None
    cpuset: str | None = None

    def validate(self, where: str) -> CpuKnobs:
        if self.cpu_shares is not None and self.cpu_weight is not None:
            raise ConfigError(f"{where}: set cpu_shares or cpu_weight, not both")
        if self.cpu_shares is not None and not SHARES_MIN <= self.cpu_shares <= SHARES_MAX:
            raise ConfigError(f"{where}: cpu_shares {self.cpu_shares} not in {SHARES_MIN}..{SHARES_MAX}")
        if self.cpu_weight is not None and not WEIGHT_MIN <= self.cpu_weight <= WEIGHT_MAX:
            raise ConfigError(f"{where}: cpu_weight {self.cpu_weight} not in {WEIGHT_MIN}..{WEIGHT_MAX}")
        if self.cfs_period_us is not None and not PERIOD_MIN <= self.cfs_period_us <= PERIOD_MAX:
            raise ConfigError(f"{where}: cfs_period_us {self.cfs_period_us} not in {PERIOD_MIN}..{PERIOD_MAX}")
        q = self.cfs_quota_us
        if q is not None and q != -1 and q < QUOTA_MIN:
            raise ConfigError(f"{where}: cfs_quota_us must be -1 (unlimited) or >= {QUOTA_MIN}, not {q}")
        if self.cfs_burst_us is not None and self.cfs_burst_us < 0:
            raise ConfigError(f"{where}: cfs_burst_us must be >= 0")
        if self.cpuset is not None:
            parse_cpuset(self.cpuset)
        return self

    @property
    def shares(self) -> int | None:
        """Effective v1 shares (converted from cpu_weight when only that is set)."""
        if self.cpu_shares is not None:
            return self.cpu_shares
        return weight_to_shares(self.cpu_weight) if self.cpu_weight is not None else None

    @property
    def weight(self) -> int | None:
        """Effective v2 weight (converted from cpu_shares when only that is set)."""
        if self.cpu_weight is not None:
            return self.cpu_weight
        return shares_to_weight(self.cpu_shares) if self.cpu_shares is not None else None

    @property
    def burst(self) -> int | None:
        """cfs_burst_us clamped to the quota (the kernel rejects burst > quota)."""
        if self.cfs_burst_us is None:
            return None
        if self.cfs_quota_us is not None and self.cfs_quota_us > 0:
            return min(self.cfs_burst_us, self.cfs_quota_us)
        return self.cfs_burst_us

    @property
    def cpus(self) -> tuple[int, ...] | None:
        return parse_cpuset(self.cpuset) if self.cpuset is not None else None

    @property
    def touches_bandwidth(self) -> bool:
        return any(v is not None for v in (self.cfs_quota_us, self.cfs_period_us, self.cfs_burst_us))


@dataclass(frozen=True)
class Priority:
    name: str
    knobs: CpuKnobs = CpuKnobs()
    pin: bool = False
    sched_idle: bool = False

    @property
    def group(self) -> str:
        return f"vcpu-{self.name}"

    @property
    def rank(self) -> tuple[int, int, str]:
        """Sort key, lowest first: idle groups, then by weight (None = default 100)."""
        idle = 0 if self.knobs.cpu_idle or self.sched_idle else 1
        return (idle, self.knobs.weight or 100, self.name)


@dataclass(frozen=True)
class QosConfig:
    cgroup_root: str = "kata-colo"
    root: CpuKnobs = CpuKnobs()
    priorities: Mapping[str, Priority] = field(default_factory=dict)
    vmm: CpuKnobs = CpuKnobs()

    def validate(self) -> QosConfig:
        if not _CGROUP_NAME.fullmatch(self.cgroup_root) or self.cgroup_root in (".", ".."):
            raise ConfigError(f"colo.cgroup_root must be a plain cgroup name, not {self.cgroup_root!r}")
        self.root.validate("colo.root")
        self.vmm.validate("colo.vmm")
        if not self.priorities:
            raise ConfigError("colo: no [colo.priorities.<name>] defined")
        root_cpus = set(self.root.cpus) if self.root.cpus is not None else None
        for name, prio in self.priorities.items():
            where = f"colo.priorities.{name}"
            if name != prio.name or not _PRIORITY_NAME.fullmatch(name):
                raise ConfigError(f"{where}: bad priority name {name!r} (lowercase letters, digits, '-')")
            prio.knobs.validate(where)
            if root_cpus is not None and prio.knobs.cpus is not None and not set(prio.knobs.cpus) <= root_cpus:
                raise ConfigError(f"{where}: cpuset {prio.knobs.cpuset} is not within colo.root cpuset "
                                  f"{self.root.cpuset}")
        return self

    @classmethod
    def from_colo(cls, colo: Any) -> QosConfig:
        """From shim.config.ColoConfig (fields cgroup_root, root, priorities)."""
        return from_colo_config(colo)

    def priority(self, name: str) -> Priority:
        try:
            return self.priorities[name]
        except KeyError:
            raise ConfigError(f"unknown vCPU priority {name!r}; configured: {sorted(self.priorities)}") from None

    @property
    def lowest(self) -> str:
        """The most best-effort priority (default for vCPUs without an explicit priority)."""
        return min(self.priorities.values(), key=lambda p: p.rank).name

    def with_priority_knobs(self, name: str, changes: Mapping[str, Any]) -> QosConfig:
        """A new config with ``changes`` (same keys as the TOML table) merged into one priority."""
        old = self.priority(name)
        merged = {**_knobs_to_table(old.knobs), "pin": old.pin, "sched_idle": old.sched_idle, **dict(changes)}
        new = _priority_from_table(name, merged)
        return dataclasses.replace(self, priorities={**self.priorities, name: new}).validate()


def _knobs_to_table(knobs: CpuKnobs) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(knobs).items() if v is not None}


def _knobs_from_table(raw: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> CpuKnobs:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {list(allowed)}")
    kwargs: dict[str, Any] = {}
    for key in _KNOB_KEYS:
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        if key == "cpu_idle":
            ok = isinstance(value, bool)
        elif key == "cpuset":
            ok = isinstance(value, str)
            value = value.strip() if ok else value
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where}.{key} has the wrong type ({type(value).__name__})")
        if key == "cpuset" and value == "":
            continue
        kwargs[key] = value
    return CpuKnobs(**kwargs).validate(where)


def _priority_from_table(name: str, raw: Mapping[str, Any]) -> Priority:
    where = f"colo.priorities.{name}"
    knobs = _knobs_from_table(raw, where, _KNOB_KEYS + ("pin", "sched_idle"))
    flags = {}
    for key in ("pin", "sched_idle"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be a boolean")
        flags[key] = value
    return Priority(name=name, knobs=knobs, **flags)


def from_tables(root: Mapping[str, Any], priorities: Mapping[str, Mapping[str, Any]],
                cgroup_root: str = "kata-colo", vmm: Mapping[str, Any] | None = None) -> QosConfig:
    """Build and validate a QosConfig from the raw `[colo.root]` / `[colo.priorities.*]` /
    `[colo.vmm]` tables."""
    if not isinstance(priorities, Mapping):
        raise ConfigError("colo.priorities must be a table of tables")
    prios = {str(name): _priority_from_table(str(name), raw) for name, raw in priorities.items()}
    return QosConfig(cgroup_root=cgroup_root, root=_knobs_from_table(root, "colo.root", _KNOB_KEYS),
                     priorities=prios, vmm=_knobs_from_table(vmm or {}, "colo.vmm", _KNOB_KEYS)).validate()


def root_knobs(colo: Any) -> CpuKnobs:
    """Only `[colo.root]` of shim.config.ColoConfig (no priorities needed)."""
    return _knobs_from_table(colo.root, "colo.root", _KNOB_KEYS)


def from_colo_config(colo: Any) -> QosConfig:
    """From shim.config.ColoConfig (fields cgroup_root, root, vmm, priorities)."""
    return from_tables(colo.root, colo.priorities, colo.cgroup_root, getattr(colo, "vmm", None))
