"""kata-colo-monitor scraped by Debian's real ``prometheus`` (2.42): a CRI pod (containerd's CRI
plugin, handler kata-colo, one QEMU/TCG VM) shows up in PromQL as ``kata_guest_meminfo`` with its
``cri_name``; a sandbox killed while scrapes are in flight does not break the monitor (every
answer stays a well-formed 200, the failure is counted, Prometheus keeps ``up == 1``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_cri_pod import IMAGE, PAUSE_IMAGE, _remove_all, _start_pod, _wait_for_images, cri, until
from tests.support.containerd import Containerd

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="apt install prometheus")]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - localhost test URL
        return r.status, r.read()


@pytest.fixture(scope="module")
def stack(cri_containerd: Containerd):
    """kata-colo-monitor on the CRI containerd, Prometheus scraping it every second."""
    work = Path(tempfile.mkdtemp(prefix="kc-prom-"))
    mport, pport = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    monitor = subprocess.Popen([sys.executable, "-m", "monitor", "--listen-address", f"127.0.0.1:{mport}",
                                "--runtime-endpoint", cri_containerd.address, "--log-level", "debug"],
                               env=env, stdout=open(work / "monitor.log", "w"), stderr=subprocess.STDOUT)
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: kata-colo\n    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=open(work / "prometheus.log", "w"), stderr=subprocess.STDOUT)
    try:
        until("monitor up", lambda: http_get(f"http://127.0.0.1:{mport}/sandboxes")[0] == 200, timeout=20)
        until("prometheus up", lambda: http_get(f"http://127.0.0.1:{pport}/-/ready")[0] == 200, timeout=60)
        yield f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{pport}", work
    finally:
        for p in (prom, monitor):
            p.send_signal(signal.SIGTERM)
        for p in (prom, monitor):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def promql(prom: str, query: str) -> list[dict]:
    _, body = http_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_prometheus_sees_the_pods_guest_memory_by_cri_name(stack, cri_containerd):
    monitor, prom, work = stack
    c = cri_containerd
    run_id = uuid.uuid4().hex[:6]
    labels = {"kata-colo.e2e/run": run_id}

    async def start(client):
        await _wait_for_images(client, PAUSE_IMAGE, IMAGE)
        return await _start_pod(client, c, f"kc-prom-{run_id}", labels)

    pod = cri(c, start)
    try:
        name = pod.name
        result = until("kata_guest_meminfo in Prometheus",
                       lambda: promql(prom, f'kata_guest_meminfo{{cri_name="{name}",item="mem_total"}}'),
                       timeout=90, interval=1)
        assert isinstance(result, list)
        metric = result[0]["metric"]
        assert metric["sandbox_id"] == pod.id and metric["cri_namespace"] == "kc-e2e"
        assert metric["cri_uid"] == f"{name}-uid" and int(float(result[0]["value"][1])) > 100 << 20
        for query in (f'kata_hypervisor_threads{{cri_name="{name}"}}', f'kata_shim_threads{{cri_name="{name}"}}',
                      f'kata_shim_rpc_durations_histogram_milliseconds_count{{cri_name="{name}",action="create"}}',
                      'kata_monitor_running_shim_count'):
            assert promql(prom, query), query
        _killed_mid_scrape(monitor, prom, pod.id)
    finally:
        cri(c, lambda client: _remove_all(client, labels))


def _killed_mid_scrape(monitor: str, prom: str, sandbox_id: str) -> None:
    """Scrape continuously from 4 threads while the sandbox's VMM and then its shim are SIGKILLed."""
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                status, body = http_get(f"{monitor}/metrics", timeout=10)
                answers.append((status, body.decode()))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                answers.append((0, repr(exc)))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        qemu = subprocess.run(["pgrep", "-f", f"qemu-system.*/run/kata-colo/sbs/{sandbox_id}/"],
                              capture_output=True, text=True).stdout.split()
        assert qemu, "no qemu for the pod"
        os.kill(int(qemu[0]), signal.SIGKILL)
        time.sleep(1.5)
        shims = subprocess.run(["pgrep", "-f", f"containerd-shim-kata-colo-v2.*-id {sandbox_id}"],
                               capture_output=True, text=True).stdout.split()
        for pid in shims:
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert len(answers) >= 8, len(answers)
    bad = [a for a in answers if a[0] != 200]
    assert not bad, bad[:2]
    for _, text in answers:
        list(text_string_to_metric_families(text))  # every answer is well-formed exposition
    last = {f.name: f for f in text_string_to_metric_families(answers[-1][1])}
    assert last["kata_monitor_scrape_failed_count"].samples[0].value >= 1
    up = until("prometheus up", lambda: promql(prom, 'up{job="kata-colo"}'), timeout=10)
    assert isinstance(up, list) and up[0]["value"][1] == "1"


def test_monitor_is_still_serving_after_the_kill(stack):
    monitor, _, _ = stack
    status, body = http_get(f"{monitor}/metrics")
    assert status == 200 and b"kata_monitor_scrape_count" in body
