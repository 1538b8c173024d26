"""The CPU policy's pure decision functions: suppression (cpuset and quota), relaxing, CPU
choice, burst, eviction, group identity — sample by sample, with explicit time."""
from __future__ import annotations

import dataclasses

import pytest

from resourced.policies.base import EvictPod, Features, NodeSample, SetBurst, SetCpuset, SetQuota, WriteKnob
from resourced.policies.cpu import (
    BurstConfig,
    CpuConfig,
    CpuPolicy,
    CpuState,
    EvictConfig,
    burst_actions,
    choose_cpus,
    cpuset_size,
    decide_evict,
    decide_suppress,
    identity_actions,
    offline_capacity,
    relax_gate,
    satisfaction,
)
from resourced.sampler import CpuSample

CPUS4 = (0, 1, 2, 3)


def sample(online: float = 0.0, offline: float = 0.0, system: float = 0.0, cpus: tuple[int, ...] = CPUS4,
           offline_cpus: tuple[int, ...] | None = None, quota: float | None = None, vcpus: int = 4,
           per_cpu: dict[int, float] | None = None) -> CpuSample:
    return CpuSample(interval_s=0.2, node_cpus=cpus, node_used=online + offline + system, online_used=online,
                     offline_used=offline, offline_cpus=cpus if offline_cpus is None else offline_cpus,
                     offline_quota_cores=quota, offline_vcpus=vcpus, online_per_cpu=per_cpu,
                     offline_groups=("kata-colo",))


def test_capacity_formula():
    assert offline_capacity(sample(online=1.0, offline=2.0, system=0.2), 65) == pytest.approx(4 * 0.65 - 1.2)
    assert offline_capacity(sample(online=4.0), 65) < 0
    s = CpuSample(0.2, CPUS4, node_used=1.0, online_used=0.8, offline_used=0.5, offline_cpus=CPUS4,
                  offline_quota_cores=None, offline_vcpus=0)
    assert s.system_used == 0.0  # clamped: counters of different groups never make usage negative


@pytest.mark.parametrize("cap, want", [(-3.0, 1), (0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (2.6, 3), (9.0, 4)])
def test_cpuset_size_ceil_and_bounds(cap, want):
    assert cpuset_size(cap, 1, 4) == want


def test_cpuset_size_min_cpus():
    assert cpuset_size(0.1, 2, 4) == 2
    assert cpuset_size(0.1, 8, 4) == 4


def test_choose_cpus():
    assert choose_cpus(2, CPUS4, (), None) == (2, 3)                       # top numbers without per-CPU data
    assert choose_cpus(2, CPUS4, (0, 1, 2, 3), {0: 0.9, 1: 0.0, 2: 0.5, 3: 0.1}) == (1, 3)
    assert choose_cpus(3, CPUS4, (1,), {0: 0.9, 1: 0.0, 2: 0.5, 3: 0.1}) == (1, 2, 3)
    assert choose_cpus(2, CPUS4, (0, 2), {0: 0.9, 1: 0.0}) == (0, 2)      # same count: no churn
    assert choose_cpus(1, CPUS4, (0, 9), None) == (0,)                     # an offline CPU is dropped


def test_relax_gate():
    st = CpuState()
    assert relax_gate(True, False, st, 10.0, 1.0) == (True, None)
    assert relax_gate(False, False, dataclasses.replace(st, relax_since=3.0), 10.0, 1.0) == (False, None)
    assert relax_gate(False, True, st, 10.0, 1.0) == (False, 10.0)
    assert relax_gate(False, True, dataclasses.replace(st, relax_since=9.5), 10.0, 1.0) == (False, 9.5)
    assert relax_gate(False, True, dataclasses.replace(st, relax_since=9.0), 10.0, 1.0) == (True, 9.0)


def run(cfg: CpuConfig, samples: list[tuple[float, CpuSample]]) -> list[list]:
    st, out = CpuState(), []
    applied: tuple[int, ...] | None = None
    for t, s in samples:
        if applied is not None:
            s = dataclasses.replace(s, offline_cpus=applied)
        actions, st = decide_suppress(s, cfg, st, t)
        for a in actions:
            if isinstance(a, SetCpuset):
                applied = a.cpus
        out.append(actions)
    return out


def test_cpuset_suppress_at_once_and_relax_slowly():
    cfg = CpuConfig(policy="cpuset", threshold_percent=65, relax_delay_ms=1000, grow_cpus=1)
    idle = sample(online=0.0, offline=4.0)
    busy = sample(online=2.0, offline=2.0)  # capacity 2.6 - 2 = 0.6 → 1 CPU
    res = run(cfg, [(0.0, idle), (0.2, busy), (0.4, busy), (0.6, idle), (1.4, idle), (1.6, idle), (2.6, idle),
                    (2.8, idle), (3.8, idle)])
    assert res[0] == [SetCpuset(res[0][0].reason, ("kata-colo",), (1, 2, 3))]  # 2.6 → 3 CPUs at once
    assert len(res[1]) == 1 and res[1][0].cpus == (3,)                         # burst: 1 CPU, immediately
    assert res[2] == [] and res[3] == []                                        # unchanged; relax not yet
    assert res[4] == []                                                         # 0.8 s < 1 s
    assert res[5][0].cpus == (2, 3)                                             # +1 CPU after 1 s
    assert res[6][0].cpus == (1, 2, 3)                                          # next step 1 s later
    assert res[7] == [] and res[8] == []                                        # at capacity: stays


def test_cpuset_reapplies_when_the_tree_differs():
    cfg = CpuConfig(policy="cpuset")
    st = CpuState(target_cpus=(3,))
    s = sample(online=2.0, offline=2.0, offline_cpus=CPUS4)  # a new group or someone else wrote it
    actions, _ = decide_suppress(s, cfg, st, 0.0)
    assert [a.cpus for a in actions] == [(3,)]


def test_quota_policy():
    cfg = CpuConfig(policy="cfs_quota", relax_delay_ms=500, period_us=100_000, min_quota_cores=0.1)
    st = CpuState()
    a, st = decide_suppress(sample(online=2.0, offline=2.0), cfg, st, 0.0)
    assert a == [SetQuota(a[0].reason, ("kata-colo",), 60_000, 100_000)]       # 0.6 cores
    a, st = decide_suppress(sample(online=2.6, offline=2.0, quota=0.6), cfg, st, 0.2)
    assert a[0].quota_us == 10_000                                              # floor: min_quota_cores
    a, st = decide_suppress(sample(online=0.0, quota=0.1), cfg, st, 0.4)
    assert a == []                                                              # looser: wait
    a, st = decide_suppress(sample(online=0.0, quota=0.1), cfg, st, 0.95)
    assert a[0].quota_us == 260_000                                             # 2.6 cores after 0.55 s
    cfg100 = dataclasses.replace(cfg, threshold_percent=100, relax_delay_ms=0)
    a, _ = decide_suppress(sample(online=0.0, quota=2.6), cfg100, st, 1.2)
    assert a[0].quota_us == -1                                                  # whole node: unlimited


def test_policy_none_and_no_offline_tier():
    assert decide_suppress(sample(online=4.0), CpuConfig(policy="none"), CpuState(), 0.0)[0] == []
    s = dataclasses.replace(sample(online=4.0), offline_groups=())
    assert decide_suppress(s, CpuConfig(), CpuState(), 0.0)[0] == []


def test_burst():
    assert burst_actions({"on/a": (50_000, 100_000)}, BurstConfig(enabled=False)) == []
    acts = burst_actions({"on/a": (50_000, 100_000), "on/b": (200_000, 100_000), "on/c": (-1, 100_000)},
                         BurstConfig(enabled=True, percent=1000))
    assert [(a.group, a.burst_us) for a in acts] == [("on/a", 50_000), ("on/b", 200_000)]  # clamped to quota
    acts = burst_actions({"on/a": (200_000, 100_000)}, BurstConfig(enabled=True, percent=50))
    assert acts[0].burst_us == 100_000 and isinstance(acts[0], SetBurst)


def test_satisfaction():
    assert satisfaction(sample(vcpus=0)) == 1.0
    assert satisfaction(sample(offline_cpus=(3,), vcpus=4)) == 0.25
    assert satisfaction(sample(quota=0.5, vcpus=4)) == 0.125
    assert satisfaction(sample(vcpus=2)) == 1.0


def test_evict_after_sustained_starvation_then_cooldown():
    cfg = EvictConfig(enabled=True, satisfaction_floor_percent=30, usage_percent=90, after_s=2, cooldown_s=10)
    starving = sample(offline=0.95, offline_cpus=(3,), vcpus=8)   # 1/8 satisfied, 95 % used
    st = CpuState()
    a, st = decide_evict(starving, cfg, st, 0.0)
    assert a == [] and st.below_floor_since == 0.0
    a, st = decide_evict(starving, cfg, st, 1.0)
    assert a == []
    a, st = decide_evict(starving, cfg, st, 2.0)
    assert len(a) == 1 and isinstance(a[0], EvictPod)
    for t in (2.5, 5.0, 11.9):
        a, st = decide_evict(starving, cfg, st, t)
        assert a == []                                             # cooldown
    a, st = decide_evict(starving, cfg, st, 12.1)
    assert len(a) == 1


def test_evict_resets_when_satisfied_or_idle():
    cfg = EvictConfig(enabled=True, after_s=1)
    st = CpuState()
    starving = sample(offline=0.95, offline_cpus=(3,), vcpus=8)
    _, st = decide_evict(starving, cfg, st, 0.0)
    _, st = decide_evict(sample(offline=0.1, offline_cpus=(3,), vcpus=8), cfg, st, 0.5)  # not using its limit
    assert st.below_floor_since is None
    a, st = decide_evict(starving, cfg, st, 1.2)
    assert a == []
    assert decide_evict(starving, EvictConfig(enabled=False), CpuState(), 99.0)[0] == []


def test_identity_and_degradation():
    cfg = CpuConfig(offline_idle=True)
    acts = identity_actions(Features(group_identity=True, cpu_idle=True), cfg, ["on"], ["off"])
    assert acts == [WriteKnob(acts[0].reason, "on", "cpu.bvt_warp_ns", "2"),
                    WriteKnob(acts[1].reason, "off", "cpu.bvt_warp_ns", "-1")]
    back = identity_actions(Features(group_identity=True), cfg, ["on"], ["off"], release=True)
    assert [a.value for a in back] == ["0", "0"]
    deg = identity_actions(Features(cpu_idle=True), cfg, ["on"], ["off"])
    assert deg == [WriteKnob(deg[0].reason, "off", "cpu.idle", "1")]
    assert identity_actions(Features(cpu_idle=True), CpuConfig(), ["on"], ["off"]) == []
    assert identity_actions(Features(), cfg, ["on"], ["off"]) == []   # nothing to degrade to


def test_policy_object_round_trip():
    p = CpuPolicy(CpuConfig(burst=BurstConfig(enabled=True)))
    assert p.setup(Features(), [], ["kata-colo"]) == []
    acts = p.decide(NodeSample(0.0, sample(online=3.0, offline=1.0), {"online_limits": {"on": (10_000, 100_000)}}))
    assert [type(a).__name__ for a in acts] == ["SetCpuset", "SetBurst"]
    assert p.gauges()["offline_cpuset_cpus"] == 1.0
    rel = p.release([], ["kata-colo"], CPUS4)
    assert rel == [SetCpuset(rel[0].reason, ("kata-colo",), CPUS4)]
    off = CpuPolicy(CpuConfig(enabled=False))
    assert off.decide(NodeSample(0.0, sample(online=4.0))) == [] and off.release([], ["x"], CPUS4) == []
