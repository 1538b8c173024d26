"""Collectors and parsers: the text encoder's exact names, the guest's /proc families (over a
fabricated /proc), the shim's validation of guest text and its snapshot cache, kata's histogram
buckets and action names, the pod overhead arithmetic and the per-priority cgroup families."""
from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_api.agent import guest_metrics
from common.errors import NotFound, Unavailable
from common.prom_text import Family, histogram, render
from shim.mgmt import colo, guest, overhead
from shim.mgmt.metrics import Histogram, ShimMetrics, action_name, timed_service
from tests.unit.mgmt.conftest import FakeSandbox, table_with


def parse(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_encoder_keeps_counter_names_and_go_values():
    text = render([Family("kata_monitor_scrape_count", "Scape count.", "counter").add(3),
                   Family("x_gauge", 'a "help"\nline').add(1.5, (("item", 'q"uo\\te'),)),
                   histogram("h_ms", "H.", (1.0, 2.0), [((("action", "create"),), [1, 2], 3.5, 3)])])
    assert "# TYPE kata_monitor_scrape_count counter\nkata_monitor_scrape_count 3\n" in text
    assert 'x_gauge{item="q\\"uo\\\\te"} 1.5' in text and "# HELP x_gauge a \"help\"\\nline" in text
    assert 'h_ms_bucket{action="create",le="1"} 1' in text and 'h_ms_bucket{action="create",le="+Inf"} 3' in text
    fams = parse(text)
    assert fams["h_ms"].type == "histogram" and fams["kata_monitor_scrape_count"].samples[0].value == 3


@pytest.fixture
def fake_proc(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self" / "fd").mkdir(parents=True)
    (proc / "self" / "fd" / "0").write_text("")
    (proc / "net").mkdir()
    (proc / "self" / "status").write_text("Name:\tpython3\nThreads:\t3\nVmRSS:\t  2048 kB\nVmPeak:\t 9000 kB\n"
                                          "voluntary_ctxt_switches:\t12\n")
    (proc / "self" / "stat").write_text("42 (py thon) S 1 1 1 0 -1 0 0 0 0 0 150 50 7 3 20 0 3 0 99 "
                                        "1000000 500 0\n")
    (proc / "self" / "io").write_text("rchar: 10\nwchar: 20\nread_bytes: 4096\n")
    (proc / "loadavg").write_text("0.50 0.25 0.10 2/133 777\n")
    (proc / "stat").write_text("cpu  100 0 50 1000 5 0 1 0 0 0\ncpu0 60 0 30 500 5 0 1 0 0 0\n"
                               "cpu1 40 0 20 500 0 0 0 0 0 0\nintr 1 2 3\n")
    (proc / "vmstat").write_text("nr_free_pages 1234\npgfault 99\n")
    (proc / "meminfo").write_text("MemTotal:        524288 kB\nMemAvailable:    262144 kB\nActive(anon):  1 kB\n"
                                  "HugePages_Total:       0\nDirectMap4k:   1024 kB\nSReclaimable:   8 kB\n")
    (proc / "net" / "dev").write_text("Inter-| Receive\n face |bytes\n  eth0: " + " ".join(str(i) for i in range(16))
                                      + "\n")
    (proc / "diskstats").write_text("   8       0 vda 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n")
    (proc / "mounts").write_text("proc /proc proc rw 0 0\nnone / rootfs rw 0 0\n")
    return proc


def test_guest_families_are_kata_names(fake_proc):
    fams = parse(guest_metrics.metrics_text(str(fake_proc)))
    mem = {s.labels["item"]: s.value for s in fams["kata_guest_meminfo"].samples}
    assert mem == {"mem_total": 524288 * 1024, "mem_available": 262144 * 1024, "active_anon": 1024,
                   "hugepages_total": 0, "direct_map_4k": 1024 * 1024, "s_reclaimable": 8192}
    cpu = {(s.labels["cpu"], s.labels["item"]): s.value for s in fams["kata_guest_cpu_time"].samples}
    tck = os.sysconf("SC_CLK_TCK")
    assert cpu[("total", "user")] == 100 * 1000 / tck and cpu[("1", "system")] == 20 * 1000 / tck
    assert {s.labels["item"]: s.value for s in fams["kata_guest_load"].samples} == {
        "load1": 0.5, "load5": 0.25, "load15": 0.1}
    assert {s.labels["item"]: s.value for s in fams["kata_guest_tasks"].samples} == {"cur": 2, "max": 133}
    assert {s.labels["item"] for s in fams["kata_guest_vm_stat"].samples} == {"nr_free_pages", "pgfault"}
    net = {s.labels["item"]: s.value for s in fams["kata_guest_netdev_stat"].samples}
    assert net["recv_bytes"] == 0 and net["sent_compressed"] == 15
    disk = {s.labels["item"]: s.value for s in fams["kata_guest_diskstat"].samples if s.labels["disk"] == "vda"}
    assert disk["reads"] == 1 and disk["time_flushing"] == 17
    assert "kata_guest_filesystem_bytes" in fams  # "/" is statvfs'd (the host's here)
    assert fams["kata_agent_scrape_count"].type == "counter"
    assert fams["kata_agent_threads"].samples[0].value == 3
    assert {s.labels["item"]: s.value for s in fams["kata_agent_proc_stat"].samples}["utime"] == 150
    status = {s.labels["item"]: s.value for s in fams["kata_agent_proc_status"].samples}
    assert status["vmrss"] == 2048 and status["voluntary_ctxt_switches"] == 12
    assert fams["kata_agent_io_stat"].samples[0].labels == {"item": "rchar"}


def test_guest_families_survive_a_missing_or_garbled_proc(tmp_path):
    (tmp_path / "stat").write_text("cpu x y\n")
    (tmp_path / "meminfo").write_text("garbage\n:::\n")
    fams = parse(guest_metrics.metrics_text(str(tmp_path)))
    assert "kata_agent_scrape_count" in fams and "kata_guest_meminfo" not in fams


def test_sanitize_drops_and_counts(fake_proc):
    errors: Counter[str] = Counter()
    good = guest_metrics.metrics_text(str(fake_proc))
    evil = ("# TYPE evil_family gauge\nevil_family 1\n"
            "# TYPE kata_guest_x gauge\n" + "".join(f'kata_guest_x{{a="{i}"}} 1\n' for i in range(5))
            + f'kata_guest_y{{item="{"v" * 1000}"}} 1\n')
    fams = guest.sanitize(good + evil, errors)
    names = {f.name for f in fams}
    assert "evil_family" not in names and "kata_guest_meminfo" in names and "kata_guest_x" in names
    assert errors["foreign_family"] == 1 and errors["bad_label"] == 1
    assert guest.sanitize("x" * (guest.MAX_TEXT + 1), errors) == [] and errors["too_large"] == 1
    assert guest.sanitize('kata_guest_z{item="unterminated 1\n', errors) == [] and errors["parse"] == 1
    many = "".join(f'kata_guest_m{{i="{i}"}} 1\n' for i in range(guest.MAX_SAMPLES + 5))
    assert sum(len(f.samples) for f in guest.sanitize(many, errors)) == guest.MAX_SAMPLES
    assert errors["too_many_samples"] == 1


async def test_guest_snapshot_is_cached_and_failures_never_raise():
    now = [100.0]
    calls = []
    answers: list[object] = ["kata_guest_load{item=\"load1\"} 1\n"]

    async def fetch() -> str:
        calls.append(now[0])
        answer = answers[0]
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    g = guest.GuestMetrics(fetch, clock=lambda: now[0])
    assert "load1" in await g.get() and len(calls) == 1
    now[0] += 1
    await g.get()
    assert len(calls) == 1  # fresh: served from the snapshot
    now[0] += guest.FRESH + 1
    answers[0] = Unavailable("agent gone")
    assert "load1" in await g.get()  # stale but young enough: served, refreshed in the background
    await asyncio.sleep(0.05)
    assert len(calls) == 2 and g.errors["unavailable"] == 1
    now[0] += guest.MAX_AGE + 1
    assert await g.get() == ""  # too old and the guest fails: nothing rather than stale data
    answers[0] = NotFound("no GetMetrics")
    now[0] += guest.MAX_AGE + 1
    await g.get()
    assert not g.supported and await g.get() == ""
    fams = {f.name: f for f in g.families()}
    assert ("kata_colo_guest_metrics_errors" in fams and fams["kata_colo_guest_metrics_age_seconds"].samples)


async def test_guest_timeout_is_counted(monkeypatch):
    monkeypatch.setattr(guest, "TIMEOUT", 0.05)

    async def hang() -> str:
        await asyncio.sleep(10)
        return ""

    g = guest.GuestMetrics(hang)
    assert await g.get() == ""
    assert g.errors["timeout"] == 1


def test_histogram_buckets_and_action_names():
    h = Histogram("kata_shim_rpc_durations_histogram_milliseconds", "RPC latency distributions.")
    for ms in (0.2, 1.0, 1.5, 600.0):
        h.observe("create", ms)
    fam = h.family()
    buckets = {dict(lbl)["le"]: v for suffix, lbl, v in fam.samples if suffix == "_bucket"}
    assert buckets["1"] == 2 and buckets["2"] == 3 and buckets["512"] == 3 and buckets["+Inf"] == 4
    assert list(buckets)[:10] == ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512"]
    assert [action_name(n) for n in ("CloseIO", "ResizePty", "Create", "Shutdown")] == [
        "close_io", "resize_pty", "create", "shutdown"]


async def test_timed_service_records_only_task_rpcs():
    class Svc:
        async def State(self, req, ctx):  # noqa: N802
            return "ok"

        async def Kill(self, req, ctx):  # noqa: N802
            raise NotFound("gone")

        helper = 7

    h = Histogram("h", "h")
    timed = timed_service(Svc(), h)
    assert await timed.State(None, None) == "ok"
    with pytest.raises(NotFound):
        await timed.Kill(None, None)
    assert timed.helper == 7 and h.count("state") == 1 and h.count("kill") == 1


def test_overhead_is_host_minus_guest():
    a = overhead.Snapshot(at=10.0, host_cpu_s=5.0, guest_cpu_s=2.0, host_mem=600, guest_mem=100)
    b = overhead.Snapshot(at=11.0, host_cpu_s=5.5, guest_cpu_s=2.2, host_mem=650, guest_mem=150)
    cpu, mem = overhead.compute(a, b)
    assert cpu == pytest.approx(30.0) and mem == 500


async def test_overhead_measures_from_the_qos_cgroup():
    sb = FakeSandbox()
    ov = overhead.PodOverhead(sb, lambda: ["c1", "c2"])
    usage = iter([4_000_000_000, 4_500_000_000])
    group = sb.resource("qos").manager.sandbox_group
    sb.driver.cpu_usage_ns = lambda rel: next(usage) if rel == group else 0  # type: ignore[method-assign]

    async def no_sleep(_: float) -> None:
        return None

    await ov.measure(sleep=no_sleep)
    assert ov.source["cpu"] == f"cgroup /{group}" and ov.source["memory"].startswith("process ")
    assert ov.cpu_percent is not None and ov.cpu_percent > 0
    assert ov.memory_bytes is not None
    names = [f.name for f in ov.families()]
    assert names[:2] == ["kata_shim_pod_overhead_cpu", "kata_shim_pod_overhead_memory_in_bytes"]


def test_colo_families_per_priority():
    sb = FakeSandbox()
    view = colo.qos_view(sb)
    assert view is not None and view.assignment == {0: "high", 1: "low"}
    fams = {f.name: f for f in colo.collect(view)}
    knobs = {(dict(lbl)["priority"], dict(lbl)["knob"]): v for _, lbl, v in fams["kata_colo_priority_knob"].samples}
    assert knobs[("high", "cpu_shares")] == 1024 and knobs[("low", "cpu_shares")] == 2
    throttled = {dict(lbl)["priority"]: v for _, lbl, v in fams["kata_colo_vcpu_throttled_seconds"].samples}
    assert throttled == {"high": 2.5, "low": 2.5}
    assert {dict(lbl)["vcpu"] for _, lbl, v in fams["kata_colo_vcpu_thread_cpu_seconds"].samples} == {"0", "1"}
    assert fams["kata_colo_vcpu_cpu_time_seconds"].type == "counter"


async def test_shim_metrics_render_all_parts():
    sb = FakeSandbox()
    m = ShimMetrics(sb, lambda: table_with("c1").ids())
    m.observe_agent_rpc("StatsContainer", 0.003)
    text = await m.render()
    fams = parse(text)
    for name in ("kata_shim_threads", "kata_shim_proc_status", "kata_shim_io_stat", "kata_shim_fds",
                 "kata_hypervisor_threads", "kata_hypervisor_proc_stat", "kata_colo_vcpus",
                 "kata_colo_vm_memory_bytes", "kata_guest_meminfo", "kata_agent_scrape_count",
                 "kata_shim_pod_overhead_cpu", "kata_shim_agent_rpc_durations_histogram_milliseconds"):
        assert name in fams, name
    assert fams["kata_shim_agent_rpc_durations_histogram_milliseconds"].samples[0].labels["action"] == \
        "grpc.StatsContainerRequest"
    await m.close()
