"""The CPU policy: Koordinator-style BE CPU suppression, optional CPU burst for online groups,
optional eviction of the lowest-priority offline pod, group identity where the kernel has it.

Suppression (HOST-FACTS §4), every sample::

    offline capacity = node CPUs × threshold − online usage − system usage     (cores)

* ``policy = "cpuset"``: the offline tiers get ceil(capacity) whole CPUs (Koordinator rounds a
  quantity up the same way), at least ``min_cpus``, chosen where the online tier is least busy
  (per-CPU usage, v1) and otherwise from the top CPU numbers down; CPUs the offline tier already
  has are kept when the count does not change (no churn).
* ``policy = "cfs_quota"``: the offline tiers get ``max(capacity, min_quota_cores)`` cores of CFS
  quota per ``period_us``.

A tighter limit applies at once; a looser one only after the capacity has allowed it for
``relax_delay_ms`` and then by at most ``grow_cpus`` CPUs per sample (cpuset), so a bursty online
load does not make the offline side flap. When the daemon stops, every limit is given back.

Burst (``[cpu.burst]``): online groups with a CFS quota get ``cfs_burst_us = limit cores ×
percent/100 × period``, clamped to the quota (upstream rejects burst > quota).

Eviction (``[cpu.evict]``, off by default): CPU satisfaction = offline limit / offline request
(the vCPUs of the offline sandboxes). When it stays below ``satisfaction_floor_percent`` while the
offline tier uses at least ``usage_percent`` of its limit, for ``after_s``, one EvictPod action is
returned, then nothing for ``cooldown_s``.

Group identity (Alibaba Cloud Linux ``cpu.bvt_warp_ns``): online tiers 2, offline −1 at start, 0
again at stop. Without it the policy degrades to upstream: ``cpu.idle = 1`` on the offline tiers
when ``offline_idle = true`` (off by default: kubelet rewrites kubepods/besteffort's cpu.shares,
which an idle group refuses; kata-colo's own root gets cpu.idle from the shim's [colo.root]).

Every function here is pure; :class:`CpuPolicy` only keeps the state between samples.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from resourced.policies.base import (
    Action,
    EvictPod,
    Features,
    NodeSample,
    SetBurst,
    SetCpuset,
    SetQuota,
    WriteKnob,
)
from resourced.policyfile import Table
from resourced.sampler import CpuSample

EPS = 1e-6


@dataclass(frozen=True)
class BurstConfig:
    enabled: bool = False
    percent: float = 100.0


@dataclass(frozen=True)
class EvictConfig:
    enabled: bool = False
    satisfaction_floor_percent: float = 30.0
    usage_percent: float = 90.0
    after_s: float = 10.0
    cooldown_s: float = 60.0


@dataclass(frozen=True)
class CpuConfig:
    enabled: bool = True
    policy: str = "cpuset"              # cpuset | cfs_quota | none
    threshold_percent: float = 65.0
    min_cpus: int = 1
    grow_cpus: int = 1
    relax_delay_ms: float = 1000.0
    min_quota_cores: float = 0.02
    period_us: int = 100_000
    offline_idle: bool = False
    group_identity: bool = True
    burst: BurstConfig = BurstConfig()
    evict: EvictConfig = EvictConfig()


def parse_config(t: Table) -> CpuConfig:
    cfg = CpuConfig(
        enabled=t.boolean("enabled", True),
        policy=t.choice("policy", "cpuset", ("cpuset", "cfs_quota", "none")),
        threshold_percent=float(t.number("threshold_percent", 65.0, 1, 100)),
        min_cpus=int(t.number("min_cpus", 1, 1, 4096, integer=True)),
        grow_cpus=int(t.number("grow_cpus", 1, 1, 4096, integer=True)),
        relax_delay_ms=float(t.number("relax_delay_ms", 1000.0, 0, 3_600_000)),
        min_quota_cores=float(t.number("min_quota_cores", 0.02, 0.01, 4096)),
        period_us=int(t.number("period_us", 100_000, 1000, 1_000_000, integer=True)),
        offline_idle=t.boolean("offline_idle", False),
        group_identity=t.boolean("group_identity", True),
    )
    b = t.sub("burst")
    burst = BurstConfig(enabled=b.boolean("enabled", False), percent=float(b.number("percent", 100.0, 0, 10_000)))
    b.done()
    e = t.sub("evict")
    evict = EvictConfig(
        enabled=e.boolean("enabled", False),
        satisfaction_floor_percent=float(e.number("satisfaction_floor_percent", 30.0, 0, 100)),
        usage_percent=float(e.number("usage_percent", 90.0, 0, 100)),
        after_s=float(e.number("after_s", 10.0, 0, 86400)),
        cooldown_s=float(e.number("cooldown_s", 60.0, 0, 86400)),
    )
    e.done()
    t.done()
    return dataclasses.replace(cfg, burst=burst, evict=evict)


@dataclass(frozen=True)
class CpuState:
    """What the policy remembers between samples."""

    target_cpus: tuple[int, ...] = ()        # cpuset last decided (empty: not yet)
    target_quota_cores: float | None = None  # quota last decided (None: unlimited / not yet)
    relax_since: float | None = None         # when a looser limit first became possible
    below_floor_since: float | None = None
    last_evict: float | None = None
    capacity: float = 0.0
    satisfaction: float = 1.0


# -- pure decision functions ------------------------------------------------------------------

def offline_capacity(s: CpuSample, threshold_percent: float) -> float:
    """node CPUs × threshold − online usage − system usage, in cores (may be negative)."""
    return len(s.node_cpus) * threshold_percent / 100.0 - s.online_used - s.system_used


def cpuset_size(capacity: float, min_cpus: int, ncpus: int) -> int:
    """Whole CPUs for the offline tier: ceil(capacity), within min_cpus..ncpus."""
    return max(min(min_cpus, ncpus), min(ncpus, math.ceil(capacity - EPS)))


def choose_cpus(n: int, node_cpus: tuple[int, ...], current: tuple[int, ...],
                online_per_cpu: Mapping[int, float] | None) -> tuple[int, ...]:
    """Which ``n`` CPUs: keep ``current`` if it already has ``n`` valid CPUs; when shrinking drop
    the CPUs where online is busiest; when growing add those where it is least busy. Without
    per-CPU numbers the highest-numbered CPUs are preferred (online load usually starts low)."""
    valid = [c for c in current if c in node_cpus]
    if len(valid) == n:
        return tuple(sorted(valid))
    load = online_per_cpu or {}

    def busy(c: int) -> tuple[float, int]:
        return (load.get(c, 0.0), -c)

    if len(valid) > n:
        keep = sorted(valid, key=busy)[:n]
    else:
        extra = sorted((c for c in node_cpus if c not in valid), key=busy)[: n - len(valid)]
        keep = valid + extra
    return tuple(sorted(keep))


def relax_gate(tighter: bool, looser: bool, state: CpuState, now: float, delay_s: float) -> tuple[bool, float | None]:
    """(apply the change now?, new relax_since). Tighter: at once. Looser: after ``delay_s``
    of continuous possibility."""
    if tighter:
        return True, None
    if not looser:
        return False, None
    since = state.relax_since if state.relax_since is not None else now
    return now - since >= delay_s - EPS, since


def decide_suppress(s: CpuSample, cfg: CpuConfig, state: CpuState, now: float) -> tuple[list[Action], CpuState]:
    if cfg.policy == "none" or not s.offline_groups:
        return [], state
    cap = offline_capacity(s, cfg.threshold_percent)
    state = dataclasses.replace(state, capacity=cap)
    groups = s.offline_groups
    delay = cfg.relax_delay_ms / 1000.0
    why = (f"capacity {cap:.2f} = {len(s.node_cpus)}×{cfg.threshold_percent:g}% − online {s.online_used:.2f} "
           f"− system {s.system_used:.2f}")
    if cfg.policy == "cpuset":
        current = state.target_cpus or s.offline_cpus or s.node_cpus
        want = cpuset_size(cap, cfg.min_cpus, len(s.node_cpus))
        have = len(current)
        go, since = relax_gate(want < have, want > have, state, now, delay)
        if go and want > have:
            want = min(want, have + cfg.grow_cpus)
            since = now if want < cpuset_size(cap, cfg.min_cpus, len(s.node_cpus)) else None
        n = want if go else have
        cpus = choose_cpus(n, s.node_cpus, current, s.online_per_cpu)
        state = dataclasses.replace(state, relax_since=since, target_cpus=cpus)
        if cpus != tuple(sorted(s.offline_cpus)):
            return [SetCpuset(f"{why} → {len(cpus)} CPU(s)", groups, cpus)], state
        return [], state
    # cfs_quota
    want_q = max(cap, cfg.min_quota_cores)
    unlimited = want_q >= len(s.node_cpus) - EPS
    have_q = state.target_quota_cores if state.target_quota_cores is not None else s.offline_quota_cores
    have_val = have_q if have_q is not None else float(len(s.node_cpus))
    go, since = relax_gate(want_q < have_val - 0.01, want_q > have_val + 0.01, state, now, delay)
    state = dataclasses.replace(state, relax_since=since)
    if not go:
        return [], state
    state = dataclasses.replace(state, target_quota_cores=None if unlimited else want_q)
    quota = -1 if unlimited else int(want_q * cfg.period_us)
    return [SetQuota(f"{why} → {'unlimited' if unlimited else f'{want_q:.2f} cores'}", groups, quota,
                     cfg.period_us)], state


def burst_actions(online_limits: Mapping[str, tuple[int, int]], cfg: BurstConfig) -> list[Action]:
    """cfs_burst_us for each online group with a quota (``online_limits``: group → (quota_us,
    period_us)); limit cores × percent/100 × period, clamped to the quota."""
    if not cfg.enabled:
        return []
    out: list[Action] = []
    for group, (quota, period) in sorted(online_limits.items()):
        if quota <= 0 or period <= 0:
            continue
        burst = min(quota, int(quota / period * cfg.percent / 100.0 * period))
        out.append(SetBurst(f"limit {quota / period:.2f} cores × {cfg.percent:g}%", group, burst))
    return out


def satisfaction(s: CpuSample) -> float:
    """Offline limit / offline request (1.0 when nothing is requested)."""
    if s.offline_vcpus <= 0:
        return 1.0
    return min(1.0, s.offline_limit_cores / s.offline_vcpus)


def decide_evict(s: CpuSample, cfg: EvictConfig, state: CpuState, now: float) -> tuple[list[Action], CpuState]:
    rate = satisfaction(s)
    state = dataclasses.replace(state, satisfaction=rate)
    if not cfg.enabled:
        return [], state
    limit = s.offline_limit_cores
    starving = (limit > 0 and s.offline_used / limit >= cfg.usage_percent / 100.0
                and rate < cfg.satisfaction_floor_percent / 100.0)
    if not starving:
        return [], dataclasses.replace(state, below_floor_since=None)
    since = state.below_floor_since if state.below_floor_since is not None else now
    state = dataclasses.replace(state, below_floor_since=since)
    cooling = state.last_evict is not None and now - state.last_evict < cfg.cooldown_s
    if now - since < cfg.after_s - EPS or cooling:
        return [], state
    reason = (f"CPU satisfaction {rate:.0%} < {cfg.satisfaction_floor_percent:g}% for {now - since:.1f}s "
              f"(offline uses {s.offline_used:.2f} of {limit:.2f} cores, requests {s.offline_vcpus})")
    return [EvictPod(reason)], dataclasses.replace(state, last_evict=now, below_floor_since=None)


def identity_actions(features: Features, cfg: CpuConfig, online: list[str], offline: list[str],
                     release: bool = False) -> list[Action]:
    """Group identity (bvt) on the tiers, or the upstream degradation (cpu.idle on offline)."""
    out: list[Action] = []
    if features.group_identity and cfg.group_identity:
        for g in online:
            out.append(WriteKnob("group identity: online", g, "cpu.bvt_warp_ns", "0" if release else "2"))
        for g in offline:
            out.append(WriteKnob("group identity: offline", g, "cpu.bvt_warp_ns", "0" if release else "-1"))
    elif cfg.offline_idle and features.cpu_idle:
        for g in offline:
            out.append(WriteKnob("no group identity: upstream cpu.idle on the offline tier", g, "cpu.idle",
                                 "0" if release else "1"))
    return out


# -- the policy object ---------------------------------------------------------------------------

@dataclass
class CpuPolicy:
    name: ClassVar[str] = "cpu"
    config: CpuConfig = CpuConfig()
    state: CpuState = field(default_factory=CpuState)
    features: Features = Features()

    @classmethod
    def from_table(cls, table: Table) -> CpuPolicy:
        return cls(parse_config(table))

    def setup(self, features: Features, online: list[str], offline: list[str]) -> list[Action]:
        self.features = features
        if not self.config.enabled:
            return []
        return identity_actions(features, self.config, online, offline)

    def decide(self, sample: NodeSample) -> list[Action]:
        if not self.config.enabled:
            return []
        s = sample.cpu
        actions, state = decide_suppress(s, self.config, self.state, sample.t)
        evict, state = decide_evict(s, self.config.evict, state, sample.t)
        self.state = state
        limits = sample.extra.get("online_limits", {}) if isinstance(sample.extra, dict) else {}
        return actions + burst_actions(limits, self.config.burst) + evict

    def release(self, online: list[str], offline: list[str], node_cpus: tuple[int, ...]) -> list[Action]:
        if not self.config.enabled:
            return []
        out: list[Action] = []
        if offline and self.config.policy == "cpuset":
            out.append(SetCpuset("daemon stopping: give the offline tier every CPU", tuple(offline), node_cpus))
        if offline and self.config.policy == "cfs_quota":
            out.append(SetQuota("daemon stopping: no offline quota", tuple(offline), -1, self.config.period_us))
        return out + identity_actions(self.features, self.config, online, offline, release=True)

    def gauges(self) -> dict[str, float]:
        st = self.state
        return {"offline_capacity_cores": st.capacity, "cpu_satisfaction_ratio": st.satisfaction,
                "offline_cpuset_cpus": float(len(st.target_cpus)),
                "offline_quota_cores": st.target_quota_cores if st.target_quota_cores is not None else -1.0}
