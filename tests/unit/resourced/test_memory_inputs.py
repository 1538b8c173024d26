"""The memory policy's inputs and its resizes, against files and fake shims: /proc/meminfo and
PSI parsing, a memory cgroup as the node (v1 and v2), the VMM's cgroup, the shim documents
(checked and capped: a malformed one drops the sandbox), the poller over real Unix sockets
(aiohttp servers standing in for shims, one of them dead), and PUT /colo/memory outcomes (ok,
timeout with the size reached, refused, failed, dry run without any request)."""
from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from common.errors import KataColoError
from resourced.policies.memory import HostMemory, ResizeMemory
from resourced.policies.memory_sample import (
    SandboxPoller,
    parse_psi,
    read_cgroup_node,
    read_host,
    to_sandbox,
    vmm_cgroup,
)
from resourced.resize import resize

MIB = 1 << 20
GIB = 1 << 30


def doc(target: int = GIB, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"target_bytes": target, "actual_bytes": target, "floor_bytes": 300 * MIB,
                         "max_bytes": 2 * GIB, "resizing_to": None, "vmm_pid": os.getpid(),
                         "guest": {"available_bytes": 700 * MIB, "source": "agent"}}
    d.update(extra)
    return d


def test_parse_psi_and_read_host(tmp_path):
    assert parse_psi("some avg10=1.50 avg60=0.2 avg300=0 total=5\nfull avg10=0.25 avg60=0 avg300=0 total=1\n") \
        == (1.5, 0.25)
    assert parse_psi("") == (None, None)
    (tmp_path / "pressure").mkdir()
    (tmp_path / "meminfo").write_text("MemTotal:       16384 kB\nMemFree: 1 kB\nMemAvailable:    4096 kB\n")
    h = read_host(str(tmp_path))
    assert (h.total, h.available, h.psi_some_avg10) == (16 << 20, 4 << 20, None)  # no PSI: None
    (tmp_path / "pressure" / "memory").write_text("some avg10=12.00 avg60=0 avg300=0 total=9\n")
    assert read_host(str(tmp_path)).psi_some_avg10 == 12.0
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")
    with pytest.raises(KataColoError, match="MemAvailable"):
        read_host(str(tmp_path))
    real = read_host()
    assert 0 < real.available <= real.total


def test_memory_cgroup_as_the_node(tmp_path):
    host = HostMemory(16 * GIB, 8 * GIB, 3.0)
    g = tmp_path / "v1"
    g.mkdir()
    (g / "memory.limit_in_bytes").write_text(f"{4 * GIB}\n")
    (g / "memory.usage_in_bytes").write_text(f"{3 * GIB}\n")
    (g / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {GIB}\n")
    n = read_cgroup_node(str(g), 1, host)
    assert (n.total, n.available, n.psi_some_avg10) == (4 * GIB, 2 * GIB, 3.0)  # v1: the host's PSI
    (g / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit: the host's total
    assert read_cgroup_node(str(g), 1, host).total == 16 * GIB
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.current").write_text(f"{GIB}\n")
    (v2 / "memory.stat").write_text("inactive_file 0\n")
    (v2 / "memory.pressure").write_text("some avg10=40.00 avg60=0 avg300=0 total=1\n")
    n = read_cgroup_node(str(v2), 2, host)
    assert (n.total, n.available, n.psi_some_avg10) == (16 * GIB, 15 * GIB, 40.0)
    with pytest.raises(KataColoError, match="memory controller"):
        read_cgroup_node(str(tmp_path / "none"), 2, host)


def test_vmm_cgroup_of_this_process():
    assert vmm_cgroup(os.getpid(), 1) is not None or vmm_cgroup(os.getpid(), 2) is not None
    assert vmm_cgroup(1 << 30, 1) is None  # no such process


def test_shim_documents_are_checked_and_capped():
    s = to_sandbox("a", doc(), True, 5.0)
    assert (s.target, s.floor, s.max, s.guest_available, s.resizing, s.offline) == (
        GIB, 300 * MIB, 2 * GIB, 700 * MIB, False, True)
    assert to_sandbox("a", doc(resizing_to=GIB), True, 0).resizing
    assert to_sandbox("a", doc(guest={"available_bytes": -5}), True, 0).guest_available is None
    assert to_sandbox("a", doc(guest={"available_bytes": 1 << 62}), True, 0).guest_available is None
    assert to_sandbox("a", doc(floor_bytes=3 * GIB), True, 0).floor == 2 * GIB  # never above the maximum
    for bad in ([1, 2], doc(target_bytes="1G"), doc(target_bytes=0), doc(max_bytes=True), doc(actual_bytes=1 << 55),
                {"target_bytes": GIB}):
        with pytest.raises(ValueError):
            to_sandbox("a", bad, True, 0)


@pytest.fixture
async def shims(tmp_path: Path) -> AsyncIterator[tuple[Path, Callable[[str, Any], None], list]]:
    """Fake shims: ``add(id, handler_result)`` serves GET/PUT /colo/memory on <root>/<id>/shim-monitor.sock."""
    runners: list[web.AppRunner] = []
    puts: list[tuple[str, Any]] = []

    async def add(sid: str, get_doc: Any, put: tuple[int, Any] | None = None) -> None:
        async def get(request: web.Request) -> web.Response:
            return web.json_response(get_doc)

        async def put_(request: web.Request) -> web.Response:
            puts.append((sid, await request.json()))
            status, body = put or (200, {})
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_get("/colo/memory", get)
        app.router.add_put("/colo/memory", put_)
        runner = web.AppRunner(app)
        await runner.setup()
        (tmp_path / sid).mkdir()
        await web.UnixSite(runner, str(tmp_path / sid / "shim-monitor.sock")).start()
        runners.append(runner)

    yield tmp_path, add, puts  # type: ignore[misc]
    for r in runners:
        await r.cleanup()


async def test_poller_reads_every_shim_and_leaves_out_the_dead_and_the_malformed(shims):
    root, add, _ = shims
    await add("sb-ok", doc())
    await add("sb-bad", {"target_bytes": "lots"})
    (root / "sb-dead").mkdir()  # a directory without a socket: the shim is gone
    cgroup = vmm_cgroup(os.getpid(), 1) or vmm_cgroup(os.getpid(), 2) or ""
    offline = SandboxPoller(str(root), lambda: [cgroup.split("/")[0] if cgroup else ""], 1)
    found = await offline.refresh()
    assert sorted(found) == ["sb-ok"] and sorted(offline.errors) == ["sb-bad", "sb-dead"]
    assert "malformed" in offline.errors["sb-bad"] and found["sb-ok"].target == GIB
    online = SandboxPoller(str(root), lambda: ["kc-no-such-tier"], 1)
    assert not (await online.refresh())["sb-ok"].offline  # its VMM is not in an offline tier


async def test_resize_outcomes(shims):
    root, add, puts = shims
    await add("ok", doc(), (200, {"target_bytes": 768 * MIB, "actual_bytes": 768 * MIB, "seconds": 1.5}))
    await add("slow", doc(), (503, {"error": "the guest gave memory back only down to 900 MiB", "status": 503,
                                    "timed_out": True, "actual_bytes": 900 * MIB}))
    await add("low", doc(), (400, {"error": "memory: 64 MiB is under the floor", "status": 400}))
    await add("gone", doc(), (409, {"error": "not running", "status": 409}))
    out = await resize(str(root), ResizeMemory("r", "ok", 768 * MIB), dry_run=False)
    assert (out.result, out.target, out.actual) == ("ok", 768 * MIB, 768 * MIB) and "in 1.50s" in out.message
    assert puts == [("ok", {"target": 768 * MIB})]
    out = await resize(str(root), ResizeMemory("r", "slow", 768 * MIB), dry_run=False)
    assert (out.result, out.target) == ("timeout", 900 * MIB) and "900 MiB" in out.message
    out = await resize(str(root), ResizeMemory("r", "low", 64 * MIB), dry_run=False)
    assert (out.result, out.target) == ("refused", None) and "under the floor" in out.message
    assert (await resize(str(root), ResizeMemory("r", "gone", GIB), dry_run=False)).result == "failed"
    assert (await resize(str(root), ResizeMemory("r", "nobody", GIB), dry_run=False)).result == "failed"
    puts.clear()
    out = await resize(str(root), ResizeMemory("r", "ok", 512 * MIB), dry_run=True)
    assert out.result == "dry_run" and "would resize ok to 512 MiB" in out.message and puts == []


def memory_daemon(root: Path, dry_run: bool) -> Any:
    from types import SimpleNamespace

    from resourced.daemon import Daemon, DaemonConfig
    from resourced.policies.memory import MemoryPolicy
    from resourced.policies.memory_config import MemoryConfig

    policy = MemoryPolicy(MemoryConfig(state_root=str(root)))
    driver = SimpleNamespace(version=1, mountpoints={c: str(root / "cg") for c in ("cpu", "cpuacct", "cpuset")})
    return Daemon(DaemonConfig(policies={"memory": policy}), dry_run=dry_run, driver=driver), policy  # type: ignore[arg-type]


@pytest.mark.parametrize("dry_run", [False, True])
async def test_daemon_runs_a_resize_and_reports_it_to_the_policy(shims, dry_run):
    root, add, puts = shims
    await add("sb1", doc(), (200, {"target_bytes": 768 * MIB, "actual_bytes": 768 * MIB, "seconds": 0.1}))
    d, policy = memory_daemon(root, dry_run)
    assert d.poller is not None
    await d.poller.refresh()
    mem = d._memory_sample(1.0)
    assert mem is not None and [s.id for s in mem.sandboxes] == ["sb1"] and mem.host.total > 0
    policy.state.asked["sb1"] = 768 * MIB
    policy.state.inflight.add("sb1")
    await d._resize("memory", ResizeMemory("test", "sb1", 768 * MIB))
    result = "dry_run" if dry_run else "ok"
    assert d.metrics.registry.get_sample_value("kata_colo_resourced_memory_resizes_total", {"result": result}) == 1
    assert puts == ([] if dry_run else [("sb1", {"target": 768 * MIB})])
    assert "sb1" not in policy.state.inflight and "sb1" in policy.state.changed_at
    d.metrics.set_sandbox_memory({"sb1": {"target": 1.0}})
    assert d.metrics.registry.get_sample_value("kata_colo_resourced_memory_sandbox_bytes",
                                               {"sandbox": "sb1", "item": "target"}) == 1.0


def test_memory_mount(tmp_path):
    from resourced.policies.memory_sample import memory_mount

    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup /x/memory cgroup rw,relatime,memory 0 0\n"
                      f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    assert memory_mount(str(mounts)) == ("/x/memory", 1)
    mounts.write_text(f"cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 {tmp_path} cgroup2 rw 0 0\n")
    assert memory_mount(str(mounts)) is None  # a unified hierarchy without the memory controller
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert memory_mount(str(mounts)) == (str(tmp_path), 2)
