"""Annotation parsing, knob/config validation, shares↔weight, guest JSON, v2 knob rendering,
cgroup version detection."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ConfigError
from shim import config
from shim.config import ColoConfig
from shim.resources.qos import (
    QosConfig,
    parse_vcpu_priorities,
    priority_map,
    render_guest_json,
    shares_to_weight,
    weight_to_shares,
)
from shim.resources.qos.cgroup_v2 import render_knobs
from shim.resources.qos.detect import detect_version
from shim.resources.qos.model import CpuKnobs, format_cpuset, from_tables, parse_cpuset

KNOWN = {"high", "low", "mid"}
REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("value", "n", "expected"), [
    ("high:2,low:2", 4, ["high", "high", "low", "low"]),
    ("low:1,high:3", 4, ["low", "high", "high", "high"]),
    (" high:1 , mid:1,low:1 ", 3, ["high", "mid", "low"]),
    ("high:1", 1, ["high"]),
])
def test_annotation_good(value: str, n: int, expected: list[str]) -> None:
    assert parse_vcpu_priorities(value, n, KNOWN) == expected


@pytest.mark.parametrize(("value", "n", "message"), [
    ("high:2,urgent:2", 4, "unknown priority 'urgent'"),
    ("high:2,low:1", 4, "names 3 vCPUs but the sandbox has 4"),
    ("high:2,low:3", 4, "names 5 vCPUs"),
    ("high=2", 2, "bad item 'high=2'"),
    ("high:two", 2, "bad item 'high:two'"),
    ("high:2,,low:2", 4, "bad item ''"),
    ("high:0,low:2", 2, "must be >= 1, not 0"),
    ("high:-1,low:3", 2, "must be >= 1, not -1"),
    ("high:1,high:1", 2, "'high' listed twice"),
    ("HIGH:2", 2, "bad item"),
    ("high:2;low:2", 4, "bad item"),
])
def test_annotation_bad(value: str, n: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_vcpu_priorities(value, n, KNOWN)


def test_annotation_absent_uses_default() -> None:
    assert parse_vcpu_priorities(None, 3, KNOWN, default="low") == ["low"] * 3
    assert parse_vcpu_priorities("  ", 2, KNOWN, default="mid") == ["mid", "mid"]
    with pytest.raises(ConfigError, match="no default"):
        parse_vcpu_priorities("", 2, KNOWN)
    with pytest.raises(ConfigError, match="not configured"):
        parse_vcpu_priorities(None, 2, KNOWN, default="urgent")


def test_priority_map_and_guest_json() -> None:
    assert priority_map(["high", "high", "low", "low"]) == {"high": [0, 1], "low": [2, 3]}
    assert priority_map({3: "low", 0: "high", 2: "low", 1: "high"}) == {"high": [0, 1], "low": [2, 3]}
    doc = json.loads(render_guest_json({3: "low", 2: "low", 0: "high", 1: "high"}, ["low", "mid", "high"]))
    assert doc == {"version": 1, "priorities": {"high": [0, 1], "low": [2, 3]},
                   "vcpus": ["high", "high", "low", "low"], "order": ["low", "high"]}


@pytest.mark.parametrize(("shares", "weight"), [(2, 1), (1024, 39), (262144, 10000), (100, 4), (4096, 157)])
def test_shares_to_weight_matches_runc(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == 1 + ((shares - 2) * 9999) // 262142 == weight


def test_weight_to_shares_round_trips() -> None:
    for w in (1, 2, 39, 100, 5000, 9999, 10000):
        s = weight_to_shares(w)
        assert shares_to_weight(s) == w and (s == 2 or shares_to_weight(s - 1) == w - 1)
    for bad in (lambda: weight_to_shares(0), lambda: weight_to_shares(10001),
                lambda: shares_to_weight(1), lambda: shares_to_weight(262145)):
        with pytest.raises(ConfigError):
            bad()


def test_cpuset_round_trip() -> None:
    assert parse_cpuset("0-2,5,7-8") == (0, 1, 2, 5, 7, 8)
    assert format_cpuset([8, 7, 5, 2, 1, 0]) == "0-2,5,7-8"
    for bad in ("1-0", "a", "", "0,,1", "-1"):
        with pytest.raises(ConfigError, match="bad cpuset"):
            parse_cpuset(bad)


def test_knobs_effective_values() -> None:
    k = from_tables({}, {"x": {"cpu_shares": 512, "cfs_quota_us": 20000, "cfs_period_us": 50000,
                               "cfs_burst_us": 80000, "cpuset": "0-1,3", "pin": True}}).priority("x")
    assert (k.knobs.shares, k.knobs.weight, k.knobs.burst, k.knobs.cpus, k.pin) == (512, 20, 20000, (0, 1, 3), True)
    w = CpuKnobs(cpu_weight=100).validate("x")
    assert w.weight == 100 and shares_to_weight(w.shares or 0) == 100
    assert CpuKnobs(cfs_burst_us=5000).burst == 5000  # no quota: nothing to clamp to
    assert CpuKnobs(cfs_quota_us=-1, cfs_burst_us=5000).burst == 5000


@pytest.mark.parametrize(("raw", "message"), [
    ({"cpu_share": 2}, "unknown key"),
    ({"cpu_shares": 1}, "not in 2..262144"),
    ({"cpu_shares": "2"}, "wrong type"),
    ({"cpu_shares": True}, "wrong type"),
    ({"cpu_shares": 2, "cpu_weight": 1}, "not both"),
    ({"cpu_weight": 10001}, "not in 1..10000"),
    ({"cpu_idle": 1}, "wrong type"),
    ({"cfs_quota_us": 0}, r"-1 \(unlimited\) or >= 1000"),
    ({"cfs_period_us": 999}, "cfs_period_us 999 not in"),
    ({"cfs_burst_us": -1}, ">= 0"),
    ({"cpuset": "1-0"}, "bad cpuset"),
    ({"cpuset": 1}, "wrong type"),
    ({"pin": "yes"}, "pin must be a boolean"),
])
def test_priority_knobs_bad(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_tables({}, {"x": raw})


def test_qos_config_from_configuration_file() -> None:
    cfg = config.parse('[colo]\ncgroup_root = "offline"\n[colo.root]\ncpu_shares = 2\ncpuset = "0-1"\n'
                       '[colo.priorities.high]\ncpu_shares = 1024\npin = true\n'
                       '[colo.priorities.low]\ncpu_idle = true\ncpuset = "1"\n')
    q = QosConfig.from_colo(cfg.colo)
    assert q.cgroup_root == "offline"
    assert q.root.shares == 2 and q.root.cpus == (0, 1)
    assert q.priority("high").pin and q.priority("low").knobs.cpu_idle
    assert q.lowest == "low"  # idle beats any weight
    packaged = QosConfig.from_colo(config.load(str(REPO / "shim" / "defaults" / "configuration.toml")).colo)
    assert packaged.lowest == "low" and packaged.priority("high").knobs.shares == 1024


@pytest.mark.parametrize(("colo", "message"), [
    (ColoConfig(priorities={"x": {}}, root={"pin": True}), "colo.root: unknown key"),
    (ColoConfig(priorities={"High": {}}), "bad priority name"),
    (ColoConfig(priorities={"x": {"bogus": 1}}), r"colo.priorities.x: unknown key"),
    (ColoConfig(root={"cpuset": "0"}, priorities={"x": {"cpuset": "0-1"}}), "not within colo.root cpuset"),
    (ColoConfig(cgroup_root="a/b", priorities={"x": {}}), "plain cgroup name"),
    (ColoConfig(priorities={}), "no \\[colo.priorities"),
])
def test_qos_config_bad(colo: ColoConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QosConfig.from_colo(colo)


def test_live_knob_merge() -> None:
    q = from_tables({}, {"low": {"cpu_shares": 2, "cpuset": "1", "pin": True}})
    q2 = q.with_priority_knobs("low", {"cpu_shares": 64})
    assert q2.priority("low").knobs.shares == 64 and q2.priority("low").knobs.cpuset == "1" and q2.priority("low").pin
    assert q.priority("low").knobs.shares == 2  # frozen: the old config is untouched
    with pytest.raises(ConfigError, match="not both"):
        q.with_priority_knobs("low", {"cpu_weight": 5})
    with pytest.raises(ConfigError, match="unknown vCPU priority"):
        q.with_priority_knobs("nope", {})


def test_v2_knob_rendering_order() -> None:
    k = CpuKnobs(cpu_shares=1024, cfs_quota_us=50000, cfs_period_us=100000, cfs_burst_us=90000, cpuset="0-1")
    assert render_knobs(k) == [("cpu.weight", "39"), ("cpu.max.burst", "0"), ("cpu.max", "50000 100000"),
                               ("cpu.max.burst", "50000"), ("cpuset.cpus", "0-1")]
    # idle: clear idle before a weight, set it after; unlimited quota keeps the current period
    assert render_knobs(CpuKnobs(cpu_idle=False, cpu_weight=10, cfs_quota_us=-1), "20000 50000") == [
        ("cpu.idle", "0"), ("cpu.weight", "10"), ("cpu.max.burst", "0"), ("cpu.max", "max 50000")]
    assert render_knobs(CpuKnobs(cpu_idle=True)) == [("cpu.idle", "1")]
    assert render_knobs(CpuKnobs(cfs_period_us=20000), "30000 100000") == [
        ("cpu.max.burst", "0"), ("cpu.max", "30000 20000")]
    assert render_knobs(CpuKnobs()) == []


def test_detect_version(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text("cgroup /c/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
                      "cgroup /c/cpuset cgroup rw,cpuset 0 0\ncgroup2 /c/unified cgroup2 rw 0 0\n")
    assert detect_version(str(hybrid)) == 1
    pure = tmp_path / "pure"
    pure.write_text("proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    assert detect_version(str(pure)) == 2
    none = tmp_path / "none"
    none.write_text("proc /proc proc rw 0 0\n")
    with pytest.raises(Exception, match="neither"):
        detect_version(str(none))
