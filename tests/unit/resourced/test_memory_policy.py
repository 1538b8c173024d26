"""The memory policy's pure decisions, sample by sample with explicit time: pressure (watermarks,
PSI) shrinks the offline sandboxes step by step within their floors, relief grows them back to
their baseline, hysteresis, cooldown, in-flight resizes, per-sandbox and time-of-day bounds, the
offline filter, an operator's resize as the new baseline, eviction; and the policy object."""
from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from resourced.policies.base import EvictPod, NodeSample
from resourced.policies.memory import (
    HostMemory,
    MemoryPolicy,
    MemorySample,
    MemoryState,
    ResizeMemory,
    SandboxMemory,
    decide,
    pressure_of,
)
from resourced.policies.memory_config import Bounds, EvictConfig, MemoryConfig, Window
from resourced.sampler import CpuSample

MIB = 1 << 20
GIB = 1 << 30
TOTAL = 16 * GIB
NOON = dt.time(12, 0)
CFG = MemoryConfig(low_watermark_percent=10, high_watermark_percent=20, psi_some_avg10=20, step_mib=256,
                   cooldown_s=10)


def host(available_gib: float, psi: float | None = None) -> HostMemory:
    return HostMemory(TOTAL, int(available_gib * GIB), psi)


def sb(sid: str, target_mib: int, floor_mib: int = 256, max_mib: int = 4096, avail_mib: int | None = None,
       offline: bool = True, resizing: bool = False, seen_at: float = 0.0) -> SandboxMemory:
    return SandboxMemory(sid, target_mib * MIB, target_mib * MIB, floor_mib * MIB, max_mib * MIB,
                         None if avail_mib is None else avail_mib * MIB, resizing, offline, seen_at)


def sample(t: float, h: HostMemory, *sandboxes: SandboxMemory, clock: dt.time = NOON) -> MemorySample:
    return MemorySample(t, clock, h, tuple(dataclasses.replace(s, seen_at=s.seen_at or t) for s in sandboxes))


def resizes(actions) -> dict[str, int]:
    return {a.sandbox_id: a.target_bytes // MIB for a in actions if isinstance(a, ResizeMemory)}


def finish(st: MemoryState, sid: str, reached_mib: int | None, at: float) -> None:
    MemoryPolicy(CFG, st).resized(sid, None if reached_mib is None else reached_mib * MIB, at)


@pytest.mark.parametrize("avail, psi, pressure, relaxed", [
    (1.0, None, True, False),     # 1 GiB < 10 % of 16 GiB
    (2.0, None, False, False),    # between the watermarks: hysteresis
    (4.0, None, False, True),
    (4.0, 25.0, True, False),     # PSI at/above its threshold is pressure whatever is available
    (4.0, 12.0, False, False),    # PSI not yet calm (≥ half the threshold): no growth
    (4.0, 5.0, False, True),
])
def test_pressure_of(avail, psi, pressure, relaxed):
    p, r, why = pressure_of(host(avail, psi), CFG)
    assert (p, r) == (pressure, relaxed)
    assert "available" in why and "PSI" in why


def test_psi_threshold_zero_means_off():
    cfg = dataclasses.replace(CFG, psi_some_avg10=0)
    assert pressure_of(host(4.0, 99.0), cfg)[:2] == (False, True)


def test_pressure_shrinks_the_guest_with_most_available_first_one_step_each_until_the_deficit_is_covered():
    st = MemoryState()
    a, b, c = sb("a", 2048, avail_mib=300), sb("b", 2048, avail_mib=1500), sb("c", 2048, avail_mib=900)
    # available 1.5 GiB, low watermark 1.6 GiB: deficit ~100 MiB < one step → one sandbox only
    out = decide(sample(0, host(1.5), a, b, c), CFG, st)
    assert resizes(out) == {"b": 1792}
    assert "pressure" in out[0].reason and "b" in out[0].reason
    # a big deficit takes a step from every sandbox, never below the floor
    st = MemoryState()
    a = sb("a", 1024, floor_mib=900, avail_mib=100)
    out = decide(sample(0, host(0.1), a, sb("b", 2048, avail_mib=1500), sb("c", 2048, avail_mib=900)), CFG, st)
    assert resizes(out) == {"b": 1792, "c": 1792, "a": 900}


def test_nothing_at_the_floor_or_the_policy_minimum():
    st = MemoryState()
    cfg = dataclasses.replace(CFG, min_mib=1536)
    out = decide(sample(0, host(0.5), sb("a", 256, floor_mib=256), sb("b", 1536)), cfg, st)
    assert out == []
    out = decide(sample(20, host(0.5), sb("c", 1600)), cfg, MemoryState())
    assert resizes(out) == {"c": 1536}


def test_cooldown_and_inflight_hold_a_sandbox():
    st = MemoryState()
    assert resizes(decide(sample(0, host(1.0), sb("a", 2048)), CFG, st)) == {"a": 1792}
    # the resize runs: the next samples (still showing 2048, still pressure) do nothing
    assert decide(sample(0.2, host(1.0), sb("a", 2048)), CFG, st) == []
    finish(st, "a", 1792, at=3.0)
    assert decide(sample(5, host(1.0), sb("a", 1792, seen_at=4.0)), CFG, st) == []  # cooling down
    assert resizes(decide(sample(13.1, host(1.0), sb("a", 1792)), CFG, st)) == {"a": 1536}
    # a sandbox its shim shows resizing is left alone as well
    assert decide(sample(0, host(1.0), sb("z", 2048, resizing=True)), CFG, MemoryState()) == []


def test_relief_grows_back_to_the_baseline_one_step_at_a_time_with_hysteresis():
    st = MemoryState()
    decide(sample(0, host(1.0), sb("a", 1024)), CFG, st)
    finish(st, "a", 768, at=1.0)
    assert decide(sample(20, host(2.0), sb("a", 768)), CFG, st) == []  # between the watermarks
    out = decide(sample(30, host(5.0), sb("a", 768)), CFG, st)
    assert resizes(out) == {"a": 1024} and "relaxed" in out[0].reason and "baseline 1024 MiB" in out[0].reason
    finish(st, "a", 1024, at=31.0)
    assert decide(sample(60, host(5.0), sb("a", 1024)), CFG, st) == []  # at its baseline


def test_relief_shares_the_headroom_most_shrunk_first():
    st = MemoryState()
    for sid in ("a", "b"):
        st.baseline[sid] = st.asked[sid] = st.seen[sid] = 2048 * MIB
    st.asked["a"] = 1024 * MIB
    st.asked["b"] = 1792 * MIB
    # available 3.2 + 0.3 GiB: headroom over the 3.2 GiB high watermark ~300 MiB: one step only
    h = HostMemory(TOTAL, int(TOTAL * 0.2) + 300 * MIB)
    out = decide(sample(0, h, sb("a", 1024), sb("b", 1792)), CFG, st)
    assert resizes(out) == {"a": 1280}


def test_an_operator_resize_becomes_the_baseline():
    st = MemoryState()
    decide(sample(0, host(5.0), sb("a", 1024)), CFG, st)
    assert st.baseline["a"] == 1024 * MIB
    decide(sample(1, host(5.0), sb("a", 1536)), CFG, st)  # kata-colo-ctl mem a 1536M
    assert st.baseline["a"] == 1536 * MIB
    # a view taken before the policy's own resize finished is not mistaken for one
    decide(sample(2, host(1.0), sb("a", 1536)), CFG, st)
    finish(st, "a", 1280, at=3.0)
    decide(sample(3.5, host(1.0), sb("a", 1536, seen_at=2.9)), CFG, st)
    assert st.baseline["a"] == 1536 * MIB and st.asked["a"] == 1280 * MIB


def test_only_offline_sandboxes_unless_all():
    out = decide(sample(0, host(1.0), sb("on", 2048, offline=False), sb("off", 2048)), CFG, MemoryState())
    assert resizes(out) == {"off": 1792}
    cfg = dataclasses.replace(CFG, sandboxes="all")
    out = decide(sample(0, host(0.1), sb("on", 2048, offline=False), sb("off", 2048)), cfg, MemoryState())
    assert resizes(out) == {"on": 1792, "off": 1792}


def test_per_sandbox_and_window_bounds():
    cfg = dataclasses.replace(CFG, per_sandbox={"batch-": Bounds(0, 1024), "batch-big": Bounds(512, 3072)},
                              windows=(Window(dt.time(21), dt.time(6), max_mib=768),))
    assert cfg.bounds("batch-1", NOON) == Bounds(0, 1024)
    assert cfg.bounds("batch-big-1", NOON) == Bounds(512, 3072)  # the longest prefix wins
    assert cfg.bounds("batch-big-1", dt.time(23, 30)) == Bounds(512, 768)  # the window wraps midnight
    assert cfg.bounds("batch-big-1", dt.time(6, 0)) == Bounds(512, 3072)
    assert cfg.bounds("other", dt.time(2)) == Bounds(0, 768)
    # above its maximum: stepped down without any pressure, one step at a time
    st = MemoryState()
    out = decide(sample(0, host(8.0), sb("batch-1", 2048)), cfg, st)
    assert resizes(out) == {"batch-1": 1792} and "above its maximum 1024 MiB" in out[0].reason
    # a relaxed node never grows a sandbox past its cap now
    st = MemoryState()
    st.baseline["x"] = st.asked["x"] = st.seen["x"] = 2048 * MIB
    st.asked["x"] = 512 * MIB
    out = decide(sample(0, host(8.0), sb("x", 512), clock=dt.time(22)), cfg, st)
    assert resizes(out) == {"x": 768}
    # a window's minimum is a floor under pressure
    cfg2 = dataclasses.replace(CFG, windows=(Window(dt.time(9), dt.time(17), min_mib=1536),))
    out = decide(sample(0, host(0.1), sb("y", 1600)), cfg2, MemoryState())
    assert resizes(out) == {"y": 1536}


def test_a_sandbox_that_left_is_forgotten():
    st = MemoryState()
    decide(sample(0, host(1.0), sb("a", 2048)), CFG, st)
    decide(sample(1, host(5.0)), CFG, st)
    assert "a" not in st.asked and "a" not in st.inflight and "a" not in st.baseline


def test_eviction_off_by_default_then_threshold_and_cooldown():
    assert not any(isinstance(a, EvictPod) for a in decide(sample(0, host(0.1)), CFG, MemoryState()))
    cfg = dataclasses.replace(CFG, evict=EvictConfig(enabled=True, threshold_percent=90, cooldown_s=4))
    st = MemoryState()
    assert decide(sample(0, host(2.0)), cfg, st) == []  # 87.5 % used
    out = decide(sample(1, host(1.0)), cfg, st)       # 93.75 %
    assert len(out) == 1 and isinstance(out[0], EvictPod) and "93.8% >= 90%" in out[0].reason
    assert decide(sample(3, host(1.0)), cfg, st) == []
    assert len(decide(sample(5.1, host(1.0)), cfg, st)) == 1


def test_disabled_policy_does_nothing():
    cfg = dataclasses.replace(CFG, enabled=False)
    assert decide(sample(0, host(0.1), sb("a", 2048)), cfg, MemoryState()) == []


def test_policy_object_reads_the_node_sample_and_exports_gauges():
    p = MemoryPolicy(CFG)
    cpu = CpuSample(0.2, (0, 1), 0.0, 0.0, 0.0, (0, 1), None, 0)
    assert p.decide(NodeSample(0, cpu, {})) == [] and p.gauges() == {}
    out = p.decide(NodeSample(0, cpu, {"memory": sample(0, host(1.0, 3.0), sb("a", 2048))}))
    assert resizes(out) == {"a": 1792}
    g = p.gauges()
    assert g["memory_pressure"] == 1.0 and g["memory_node_available_bytes"] == GIB
    assert g["memory_node_psi_some_avg10"] == 3.0 and g["memory_sandboxes_managed"] == 1.0
    assert p.sandbox_gauges()["a"] == {"target": 2048.0 * MIB, "actual": 2048.0 * MIB, "floor": 256.0 * MIB,
                                       "baseline": 2048.0 * MIB}
    # a refused or failed resize (no size): the policy keeps what the last view showed
    p.resized("a", None, 1.0)
    assert p.state.asked["a"] == 2048 * MIB and "a" not in p.state.inflight
    assert p.release([], [], ()) == []
