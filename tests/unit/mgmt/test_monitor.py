"""kata-colo-monitor without VMs: relabel/merge of shim text, inotify discovery (also of a state
root created late), the HTTP endpoints over shim doubles on real Unix sockets (one healthy, one
dead, one hanging, one that drops the connection mid-answer), and cri_* labels from a CRI double
served over real gRPC."""
from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from monitor import scrape
from monitor.discovery import SandboxWatcher
from monitor.server import Monitor, application
from proto.cri.runtime.v1 import api_pb2 as api
from proto.cri.runtime.v1 import api_pb2_grpc as api_grpc

SHIM_TEXT = """# HELP kata_guest_meminfo Statistics about memory usage in the system.
# TYPE kata_guest_meminfo gauge
kata_guest_meminfo{item="mem_total"} 536870912
# HELP kata_shim_threads Kata containerd shim v2 process threads.
# TYPE kata_shim_threads gauge
kata_shim_threads 3
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 12
"""


def test_relabel_merge_rename():
    merged = scrape.Merged()
    merged.add(SHIM_TEXT, scrape.label_text("sb1", ("u1", "pod-a", "ns")))
    merged.add(SHIM_TEXT.replace("536870912", "1024") + "garbage line\nx{} 5\n",
               scrape.label_text("sb2", ("", "", "")))
    assert merged.bad_lines == 1
    text = merged.render()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    mem = {s.labels["sandbox_id"]: s for s in fams["kata_guest_meminfo"].samples}
    assert mem["sb1"].labels == {"sandbox_id": "sb1", "cri_uid": "u1", "cri_name": "pod-a", "cri_namespace": "ns",
                                 "item": "mem_total"}
    assert mem["sb2"].value == 1024 and mem["sb2"].labels["cri_name"] == ""
    assert "kata_shim_process_open_fds" in fams and "process_open_fds" not in fams
    assert fams["x"].samples[0].labels["sandbox_id"] == "sb2"
    assert text.count("# TYPE kata_guest_meminfo gauge") == 1
    assert list(fams) == sorted(fams)
    assert scrape.Merged().render() == ""
    assert "kata_shim_threads" not in merged.render(("kata_guest_",))


async def test_watcher_sees_a_late_root_and_new_sandboxes_at_once(tmp_path):
    root = tmp_path / "run" / "kata-colo" / "sbs"
    changes: list[tuple[set[str], set[str]]] = []
    w = SandboxWatcher(str(root), lambda a, r: changes.append((a, r)))
    w.start()
    await asyncio.wait_for(w.ready.wait(), 5)
    try:
        assert w.ids == set()
        t0 = time.monotonic()
        (root / "sb-one").mkdir(parents=True)
        await _until(lambda: "sb-one" in w.ids)
        (root / "sb-two").mkdir()
        await _until(lambda: "sb-two" in w.ids)
        assert time.monotonic() - t0 < 1.0, "a new sandbox must be seen within 1 s"
        (root / "sb-one").rmdir()
        await _until(lambda: "sb-one" not in w.ids)
        (root / "not a valid id!").mkdir()
        await asyncio.sleep(0.1)
        assert w.ids == {"sb-two"}
        assert ({"sb-two"}, set()) in changes and (set(), {"sb-one"}) in changes
    finally:
        await w.close()


async def _until(check, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _shim(path: Path, handler) -> web.AppRunner:
    app = web.Application()
    async def agent_url(request):
        return web.Response(text="vsock://7:1024")

    app.add_routes([web.get("/metrics", handler), web.get("/agent-url", agent_url)])
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


class FakeCri(api_grpc.RuntimeServiceServicer):
    async def ListPodSandbox(self, request, context):  # noqa: N802 - gRPC method name
        assert request.filter.state.state == api.SANDBOX_READY
        return api.ListPodSandboxResponse(items=[api.PodSandbox(
            id="sb-good", metadata=api.PodSandboxMetadata(name="web-0", uid="uid-1", namespace="prod"))])


@pytest.fixture
async def node(tmp_path):
    root = tmp_path / "sbs"
    for sid in ("sb-good", "sb-dead", "sb-hang", "sb-drop"):
        (root / sid).mkdir(parents=True)

    async def good(request):
        return web.Response(text=SHIM_TEXT)

    async def hang(request):
        await asyncio.sleep(30)
        return web.Response(text="")

    async def drop(request):  # the sandbox is killed mid-answer
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"# HELP kata_guest_meminfo x\nkata_guest_mem")
        request.transport.abort()
        return resp

    runners = [await _shim(root / sid / "shim-monitor.sock", h)
               for sid, h in (("sb-good", good), ("sb-hang", hang), ("sb-drop", drop))]
    cri = grpc.aio.server()
    api_grpc.add_RuntimeServiceServicer_to_server(FakeCri(), cri)
    cri.add_insecure_port(f"unix://{tmp_path / 'cri.sock'}")
    await cri.start()
    monitor = Monitor(str(root), str(tmp_path / "cri.sock"))
    monitor.scraper.timeout = 0.5
    await monitor.start()
    client = TestClient(TestServer(application(monitor)))
    await client.start_server()
    yield client, monitor, root
    await client.close()
    await monitor.close()
    await cri.stop(0)
    for r in runners:
        await r.cleanup()


async def test_monitor_endpoints_skip_failing_shims(node):
    client, monitor, root = node
    t0 = time.monotonic()
    r = await client.get("/metrics")
    assert r.status == 200
    text = await r.text()
    assert time.monotonic() - t0 < 2.0, "a hanging shim must not hold the scrape past the timeout"
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert [s.labels["sandbox_id"] for s in fams["kata_guest_meminfo"].samples] == ["sb-good"]
    assert fams["kata_monitor_running_shim_count"].samples[0].value == 4
    assert fams["kata_monitor_scrape_failed_count"].samples[0].value == 3
    assert fams["kata_monitor_scrape_count"].samples[0].value == 1
    failed = {s.labels["sandbox_id"] for s in fams["kata_monitor_shim_scrape_failures"].samples}
    assert failed == {"sb-dead", "sb-hang", "sb-drop"}
    assert "kata_monitor_scrape_durations_histogram_milliseconds" in fams
    # cri_* labels arrive from CRI in the background; the next scrapes carry them
    await _until(lambda: "sb-good" in monitor.cri.meta, 5)
    text = await (await client.get("/metrics")).text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["kata_guest_meminfo"].samples[0].labels == {
        "sandbox_id": "sb-good", "cri_uid": "uid-1", "cri_name": "web-0", "cri_namespace": "prod", "item": "mem_total"}
    # per-sandbox endpoints, sandboxes, gzip, filters
    assert await (await client.get("/metrics?sandbox=sb-good")).text() == SHIM_TEXT
    assert (await client.get("/metrics?sandbox=nope")).status == 404
    assert (await client.get("/metrics?sandbox=sb-dead")).status == 503
    assert await (await client.get("/agent-url?sandbox=sb-good")).text() == "vsock://7:1024"
    assert await (await client.get("/sandboxes")).text() == "sb-dead\nsb-drop\nsb-good\nsb-hang\n"
    assert "href" in await (await client.get("/sandboxes", headers={"Accept": "text/html"})).text()
    r = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert b"kata_guest_meminfo" in gzip.decompress(await r.read())
    text = await (await client.get("/metrics?filter_family=kata_shim_")).text()
    assert "kata_shim_threads" in text and "kata_guest_meminfo" not in text and "kata_monitor_" not in text
    # a sandbox that goes away is dropped from the next scrape
    (root / "sb-dead").rmdir()
    await _until(lambda: "sb-dead" not in monitor.watcher.ids)
    text = await (await client.get("/metrics")).text()
    assert "kata_monitor_running_shim_count 3" in text
