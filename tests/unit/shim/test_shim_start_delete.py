"""The binary contract (docs/protocols.md §1) through the test wrapper, as containerd drives it:
`start` spawns/reuses the daemon and prints its address, `delete` is idempotent and cleans up
after a dead shim."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from proto.containerd.task.v2 import shim_pb2
from shim import bootstrap
from ttrpc import Client

pytestmark = [pytest.mark.root, pytest.mark.slow]
WRAPPER = Path(__file__).resolve().parents[2] / "fakes" / "bin" / "containerd-shim-kata-colo-v2"
TASK = "containerd.task.v2.Task"


def _bundle(root: Path, cid: str, args: list[str], annotations: dict[str, str] | None = None) -> Path:
    b = root / cid
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"process": {"args": args, "cwd": "/"},
                                               "annotations": annotations or {}}))
    return b


def _run(action: str, bundle: Path, cid: str, address: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(WRAPPER), "-namespace", "unit", "-address", address,
                           "-publish-binary", "/usr/bin/containerd", "-id", cid, "-bundle", str(bundle), "-debug",
                           action], cwd=bundle, input=stdin, capture_output=True, timeout=30)


def _shim_pid(path: str) -> int:
    async def go() -> int:
        c = await Client.connect_unix(path, timeout=5)
        r = await c.call(TASK, "Connect", shim_pb2.ConnectRequest(id="x"), shim_pb2.ConnectResponse,
                         timeout=5)
        await c.close()
        return r.shim_pid
    return asyncio.run(go())


def _gone(pid: int, timeout: float = 8) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def ids(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (/run/containerd/s)")
    tag = uuid.uuid4().hex[:10]
    address = f"/tmp/kc-unit-{tag}/containerd.sock"
    yield tmp_path, address, tag
    # what containerd does after every connection close: `delete` per task id; then make
    # sure nothing of this test is left in /run (state dirs, stale sockets)
    for bundle in tmp_path.iterdir():
        if bundle.is_dir() and (bundle / "config.json").exists():
            _run("delete", bundle, bundle.name, address)
            group = bootstrap.group_id(bootstrap.read_bundle_spec(bundle), bundle.name)
            sock = bootstrap.socket_path(address, "unit", group)
            if os.path.exists(sock) and not bootstrap.is_serving(sock):
                os.unlink(sock)
            shutil.rmtree(f"/run/kata-colo/sbs/{group}", ignore_errors=True)


def test_start_spawns_then_reuses_and_shutdown_exits(ids):
    tmp, address, tag = ids
    sandbox = f"sb-{tag}"
    b1 = _bundle(tmp, sandbox, ["sleep", "100"])
    b2 = _bundle(tmp, f"ctr-{tag}", ["sleep", "100"], {"io.kubernetes.cri.sandbox-id": sandbox})
    r1 = _run("start", b1, sandbox, address)
    assert r1.returncode == 0, r1.stderr
    expected = "unix://" + bootstrap.socket_path(address, "unit", sandbox)
    assert r1.stdout.decode().strip() == expected and r1.stderr == b""
    assert (b1 / "address").read_text() == expected
    path = expected.removeprefix("unix://")
    pid = _shim_pid(path)
    assert int((b1 / "shim.pid").read_text()) == pid  # the forked daemon, as runc's shim.pid
    try:
        r2 = _run("start", b2, f"ctr-{tag}", address)  # same group → same shim
        assert r2.returncode == 0 and r2.stdout.decode().strip() == expected
        assert (b2 / "address").read_text() == expected
        assert _shim_pid(path) == pid

        async def shutdown() -> None:
            c = await Client.connect_unix(path, timeout=5)
            await c.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id=sandbox), empty_pb2.Empty,
                         timeout=5)
            await c.close()
        asyncio.run(shutdown())
        assert _gone(pid), "shim did not exit after Shutdown with no tasks"
        assert not bootstrap.is_serving(path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_delete_with_nothing_there_is_ok_and_idempotent(ids):
    tmp, address, tag = ids
    b = _bundle(tmp, f"none-{tag}", ["true"])
    for _ in range(2):
        r = _run("delete", b, f"none-{tag}", address)
        assert r.returncode == 0, r.stderr
        resp = shim_pb2.DeleteResponse()
        resp.ParseFromString(r.stdout)
        assert resp.exit_status == 137 and resp.exited_at.seconds > 0


def test_delete_after_shim_crash_kills_the_task(ids):
    tmp, address, tag = ids
    cid = f"crash-{tag}"
    b = _bundle(tmp, cid, ["sleep", "1000"])
    r = _run("start", b, cid, address)
    assert r.returncode == 0, r.stderr
    path = r.stdout.decode().strip().removeprefix("unix://")

    async def create_start() -> tuple[int, int]:
        c = await Client.connect_unix(path, timeout=5)
        await c.call(TASK, "Create", shim_pb2.CreateTaskRequest(id=cid, bundle=str(b)),
                     shim_pb2.CreateTaskResponse, timeout=10)
        started = await c.call(TASK, "Start", shim_pb2.StartRequest(id=cid), shim_pb2.StartResponse,
                               timeout=10)
        conn = await c.call(TASK, "Connect", shim_pb2.ConnectRequest(id=cid),
                            shim_pb2.ConnectResponse, timeout=5)
        await c.close()
        return conn.shim_pid, started.pid
    shim_pid, task_pid = asyncio.run(create_start())
    os.kill(shim_pid, signal.SIGKILL)
    assert _gone(shim_pid)
    assert not _gone(task_pid, timeout=0.2), "the task must outlive its shim until delete"
    r = _run("delete", b, cid, address)
    assert r.returncode == 0, r.stderr
    assert _gone(task_pid), f"delete did not clean up the orphaned task: {r.stderr!r}"
    r = _run("delete", b, cid, address)  # again: nothing left, still fine
    assert r.returncode == 0
