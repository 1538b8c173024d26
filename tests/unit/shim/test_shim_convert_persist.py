"""protobuf <-> dataclass conversions and state.json persistence."""
from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from common.errors import InvalidArgument
from proto.containerd.cgroups.v1 import metrics_pb2
from proto.containerd.task.v2 import shim_pb2
from proto.runtimeoptions.v1 import options_pb2
from shim import convert, persist
from shim.backend import ExitInfo, Stats, Stdio
from shim.process import Process, Status


def test_timestamp_round_trip_and_go_zero():
    dt = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    ts = convert.datetime_to_ts(dt)
    assert (ts.seconds, ts.nanos) == (1714979289, 123456000)
    assert convert.ts_to_datetime(ts) == dt
    zero = convert.datetime_to_ts(None)
    assert zero.seconds == -62135596800 and zero.nanos == 0
    assert convert.ts_to_datetime(zero) is None
    assert convert.ts_to_datetime(timestamp_pb2.Timestamp()) is None


def test_create_and_exec_opts():
    req = shim_pb2.CreateTaskRequest(id="c", bundle="/b", stdin="/i", stdout="/o", terminal=True)
    req.rootfs.add(type="overlay", source="overlay", options=["lowerdir=/l", "upperdir=/u"])
    opts = convert.create_opts(req, {"annotations": {"io.kubernetes.cri.container-type": "sandbox"}},
                               sandbox_id="c", config_path="/etc/x.toml")
    assert opts.stdio == Stdio("/i", "/o", "", True)
    assert opts.rootfs[0].options == ("lowerdir=/l", "upperdir=/u") and opts.is_sandbox
    ex = shim_pb2.ExecProcessRequest(id="c", exec_id="e", spec=any_pb2.Any(
        type_url=convert.PROCESS_SPEC_TYPE, value=json.dumps({"args": ["ls"]}).encode()))
    assert convert.exec_opts(ex).spec["args"] == ["ls"]
    for bad in (b"", b"[]", b"{", json.dumps({"args": []}).encode()):
        ex.spec.value = bad
        with pytest.raises(InvalidArgument):
            convert.exec_opts(ex)
    with pytest.raises(InvalidArgument):
        convert.require_id("a/b")


def test_state_response_and_events():
    p = Process("c", "", "/b", Stdio("", "/o", "", False), pid=42, status=Status.RUNNING)
    r = convert.state_response(p)
    assert (r.id, r.pid, r.status, r.stdout, r.exit_status) == ("c", 42, 2, "/o", 0)
    p.set_exited(ExitInfo(9, datetime(2024, 1, 1, tzinfo=UTC)))
    r = convert.state_response(p)
    assert r.status == 3 and r.exit_status == 9 and r.exited_at.seconds == 1704067200
    ev = convert.ev_exit(p)
    assert (ev.container_id, ev.id, ev.pid, ev.exit_status) == ("c", "c", 42, 9)
    d = convert.delete_response(7, None)
    assert d.pid == 7 and d.exited_at.seconds == convert.GO_ZERO_SECONDS


def test_stats_any_is_cgroups_v1_metrics():
    a = convert.stats_any(Stats(cpu_usage_ns=5, memory_usage=10, memory_limit=20, memory_rss=3,
                                pg_fault=4, pids_current=2))
    assert a.type_url == "io.containerd.cgroups.v1.Metrics"
    m = metrics_pb2.Metrics()
    m.ParseFromString(a.value)
    assert (m.cpu.usage.total, m.memory.usage.usage, m.memory.usage.limit, m.memory.total_rss,
            m.memory.total_pg_fault, m.pids.current) == (5, 10, 20, 3, 4, 2)


def test_runtime_options_config_path():
    opts = options_pb2.Options(config_path="/etc/kata-colo/c.toml")
    raw = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
    assert convert.runtime_config_path(raw.SerializeToString()) == "/etc/kata-colo/c.toml"
    assert convert.runtime_config_path(b"") == ""
    other = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x08\x01")
    assert convert.runtime_config_path(other.SerializeToString()) == ""


def test_persist_round_trip_atomic(tmp_path):
    d = persist.state_dir("sb", tmp_path)
    st = persist.ShimState("sb", "ns", 123, backend={"vm": {"pid": 9}})
    st.containers["c"] = persist.ContainerRecord("c", "/b", 42, "running")
    persist.save(d, st)
    loaded = persist.load(d)
    assert loaded == st
    assert [p.name for p in d.iterdir()] == ["state.json"]
    (d / "state.json").write_text('{"version": 99}')
    assert persist.load(d) is None
    persist.remove(d)
    persist.remove(d)  # idempotent
    assert persist.load(d) is None
    with pytest.raises(InvalidArgument):
        persist.state_dir("../x", tmp_path)
