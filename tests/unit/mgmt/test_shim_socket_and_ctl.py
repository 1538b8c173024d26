"""The management socket as the real shim daemon serves it (shim CLI ``start`` → ``serve`` with the
host test backend: no VM), driven through ``kata-colo-ctl`` as a subprocess: socket path and mode,
``monitor_address`` in the bundle, Task RPC durations under kata's action names, the ctl commands,
their ``--json`` forms and their errors (unknown, ambiguous, dead sandbox)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from proto.containerd.task.v2 import shim_pb2
from shim import bootstrap
from ttrpc import Client

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (/run)")]
REPO = Path(__file__).resolve().parents[3]
WRAPPER = REPO / "tests" / "fakes" / "bin" / "containerd-shim-kata-colo-v2"
TASK = "containerd.task.v2.Task"
SBS = Path("/run/kata-colo/sbs")


def ctl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ctl", *args], capture_output=True, text=True, timeout=30,
                          env=env, input=stdin.decode() if stdin is not None else None)


@pytest.fixture
def shim_sandbox(tmp_path):
    tag = uuid.uuid4().hex[:10]
    sid = f"kcmgmt-{tag}"
    bundle = tmp_path / sid
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sleep", "100"], "cwd": "/"}}))
    address = f"/tmp/kc-mgmt-{tag}/containerd.sock"
    run = [sys.executable, str(WRAPPER), "-namespace", "unit", "-address", address, "-publish-binary",
           "/usr/bin/containerd", "-id", sid, "-bundle", str(bundle)]
    r = subprocess.run([*run, "start"], cwd=bundle, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    path = r.stdout.decode().strip().removeprefix("unix://")

    async def create() -> int:
        c = await Client.connect_unix(path, timeout=5)
        try:
            await c.call(TASK, "Create", shim_pb2.CreateTaskRequest(id=sid, bundle=str(bundle)),
                         shim_pb2.CreateTaskResponse, timeout=10)
            for _ in range(3):
                await c.call(TASK, "State", shim_pb2.StateRequest(id=sid), shim_pb2.StateResponse, timeout=5)
            return (await c.call(TASK, "Connect", shim_pb2.ConnectRequest(id=sid), shim_pb2.ConnectResponse,
                                 timeout=5)).shim_pid
        finally:
            await c.close()

    pid = asyncio.run(create())
    yield sid, bundle, path
    os.kill(pid, signal.SIGKILL)
    subprocess.run([*run, "delete"], cwd=bundle, capture_output=True, timeout=30)
    sock = bootstrap.socket_path(address, "unit", sid)
    if os.path.exists(sock):
        os.unlink(sock)
    shutil.rmtree(SBS / sid, ignore_errors=True)


def test_shim_serves_its_management_socket(shim_sandbox):
    sid, bundle, task_socket = shim_sandbox
    sock = SBS / sid / "shim-monitor.sock"
    deadline = time.monotonic() + 10  # the shim starts it once the Task API serves (aiohttp loads meanwhile)
    while not (bundle / "monitor_address").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert (bundle / "monitor_address").read_text() == f"unix://{sock}"
    r = ctl("metrics", sid)
    assert r.returncode == 0, r.stderr
    assert 'kata_shim_rpc_durations_histogram_milliseconds_count{action="create"} 1' in r.stdout
    assert 'kata_shim_rpc_durations_histogram_milliseconds_count{action="state"} 3' in r.stdout
    assert 'kata_shim_rpc_durations_histogram_milliseconds_bucket{action="state",le="512"}' in r.stdout
    assert "# TYPE kata_shim_fds gauge" in r.stdout and "kata_shim_proc_status{item=\"vmrss\"}" in r.stdout
    r = ctl("metrics", sid, "--json")
    names = {f["name"] for f in json.loads(r.stdout)}
    assert {"kata_shim_threads", "kata_shim_io_stat", "kata_shim_proc_stat"} <= names


def test_ctl_list_status_and_prefix(shim_sandbox):
    sid, _, _ = shim_sandbox
    r = ctl("list")
    assert r.returncode == 0 and sid in r.stdout and "SANDBOX" in r.stdout.splitlines()[0]
    r = ctl("list", "--json")
    assert json.loads(r.stdout)[sid]["containers"][0]["id"] == sid
    r = ctl("status", sid[:14], "--json")  # a unique prefix is enough
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["id"] == sid and doc["state"] == "unknown" and doc["containers"][0]["status"] == "created"
    r = ctl("status", sid)
    assert r.returncode == 0 and f"Sandbox:    {sid}" in r.stdout
    # a backend without a VM: the colo routes say so, with a non-zero exit
    r = ctl("set-priority", sid, "0", "low")
    assert r.returncode == 1 and "has no VM" in r.stderr and "HTTP 409" in r.stderr


def test_ctl_errors_unknown_ambiguous_dead(shim_sandbox):
    sid, _, _ = shim_sandbox
    r = ctl("status", "no-such-sandbox-xyz")
    assert r.returncode == 1 and "no sandbox matches 'no-such-sandbox-xyz'" in r.stderr
    dead = SBS / f"{sid}-dead"
    twin = SBS / f"{sid}-twin"
    dead.mkdir()
    twin.mkdir()
    try:
        r = ctl("status", f"{sid}-")
        assert r.returncode == 1 and "ambiguous" in r.stderr
        r = ctl("status", f"{sid}-dead")
        assert r.returncode == 1 and "no management socket" in r.stderr
        r = ctl("list")
        assert r.returncode == 0 and "unreachable" in r.stdout and sid in r.stdout
    finally:
        dead.rmdir()
        twin.rmdir()


def test_ctl_env_and_usage():
    r = ctl("env", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["state_root"] == str(SBS) and "debug_console_enabled" in doc["config"]
    r = ctl("knobs", "x", "low", "novalue")
    assert r.returncode != 0
    r = ctl()
    assert r.returncode == 2
