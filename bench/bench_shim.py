"""Shim overhead: our Python shim (test host backend) vs Debian's Go containerd-shim-runc-v2.

Both shims are started exactly as containerd does it (`start` in a real bundle, address read
from stdout), a task is created and started in each over ttrpc, then Task.State round trips are
measured with the same Python ttrpc client: sequential latency p50/p99 and requests/s, and
requests/s with N concurrent requests in flight. RSS is VmRSS of each shim process. Prints
ours/Go ratios; cleans up both shims, tasks, bundles and sockets.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import empty_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proto.containerd.task.v2 import shim_pb2  # noqa: E402
from ttrpc import Client  # noqa: E402

OUR_SHIM = REPO / "tests" / "fakes" / "bin" / "containerd-shim-kata-colo-v2"
GO_SHIM = "/usr/bin/containerd-shim-runc-v2"
TASK = "containerd.task.v2.Task"
NAMESPACE = "bench"
SEQUENTIAL = 2000
CONCURRENT = 32
CONCURRENT_TOTAL = 4000


@dataclass
class Shim:
    name: str
    task_id: str
    bundle: Path
    address: str = ""
    shim_pid: int = 0


def _busybox_bundle(bundle: Path, args: list[str]) -> None:
    """A real OCI bundle for runc: busybox rootfs + `runc spec` config."""
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir()
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "sleep"):
        os.symlink("busybox", rootfs / "bin" / applet)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=args, terminal=False)
    spec["root"] = {"path": "rootfs", "readonly": False}
    (bundle / "config.json").write_text(json.dumps(spec))


def _host_bundle(bundle: Path, args: list[str]) -> None:
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(
        {"ociVersion": "1.0.2", "process": {"args": args, "cwd": "/",
                                            "env": ["PATH=/usr/bin:/bin"]}}))


def _shim_cmd(binary: str | Path, s: Shim, grpc_address: str, action: str) -> list[str]:
    prefix = [sys.executable, str(binary)] if str(binary).endswith("-v2") and \
        str(binary).startswith(str(REPO)) else [str(binary)]
    return [*prefix, "-namespace", NAMESPACE, "-address", grpc_address, "-publish-binary",
            "/usr/bin/containerd", "-id", s.task_id, "-bundle", str(s.bundle), action]


def _log_fifo(bundle: Path, stop: threading.Event) -> threading.Thread:
    """containerd's `log` FIFO in the bundle, drained like containerd does (the Go shim exits
    at start-up without it)."""
    path = bundle / "log"
    os.mkfifo(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def drain() -> None:
        while not stop.is_set():
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 65536)
        os.close(fd)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return t


def _start(binary: str | Path, s: Shim, grpc_address: str) -> None:
    env = dict(os.environ, TTRPC_ADDRESS=grpc_address + ".ttrpc")
    r = subprocess.run(_shim_cmd(binary, s, grpc_address, "start"), cwd=s.bundle, env=env,
                       input=b"", capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{s.name} start failed: {r.stdout!r} {r.stderr!r}")
    s.address = r.stdout.decode().strip()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _create_task(s: Shim) -> None:
    c = await Client.connect_unix(s.address, timeout=5)
    try:
        await c.call(TASK, "Create", shim_pb2.CreateTaskRequest(id=s.task_id, bundle=str(s.bundle)),
                     shim_pb2.CreateTaskResponse, timeout=30)
        await c.call(TASK, "Start", shim_pb2.StartRequest(id=s.task_id), shim_pb2.StartResponse,
                     timeout=30)
        conn = await c.call(TASK, "Connect", shim_pb2.ConnectRequest(id=s.task_id),
                            shim_pb2.ConnectResponse, timeout=5)
        s.shim_pid = conn.shim_pid
    finally:
        await c.close()


async def _measure(s: Shim) -> dict[str, float]:
    c = await Client.connect_unix(s.address, timeout=5)
    req = shim_pb2.StateRequest(id=s.task_id)
    try:
        for _ in range(100):  # warm up
            await c.call(TASK, "State", req, shim_pb2.StateResponse, timeout=5)
        lat: list[float] = []
        t0 = time.perf_counter()
        for _ in range(SEQUENTIAL):
            t = time.perf_counter()
            await c.call(TASK, "State", req, shim_pb2.StateResponse, timeout=5)
            lat.append(time.perf_counter() - t)
        seq_rps = SEQUENTIAL / (time.perf_counter() - t0)
        sem = asyncio.Semaphore(CONCURRENT)

        async def one() -> None:
            async with sem:
                await c.call(TASK, "State", req, shim_pb2.StateResponse, timeout=10)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(CONCURRENT_TOTAL)))
        conc_rps = CONCURRENT_TOTAL / (time.perf_counter() - t0)
    finally:
        await c.close()
    q = statistics.quantiles(lat, n=100)
    return {"p50_us": q[49] * 1e6, "p99_us": q[98] * 1e6, "seq_rps": seq_rps,
            "conc_rps": conc_rps, "rss_kib": float(_rss_kib(s.shim_pid))}


async def _teardown_task(s: Shim) -> None:
    if not s.address:
        return
    with contextlib.suppress(Exception):
        c = await Client.connect_unix(s.address, timeout=5)
        try:
            with contextlib.suppress(Exception):
                await c.call(TASK, "Kill", shim_pb2.KillRequest(id=s.task_id, signal=9, all=True),
                             empty_pb2.Empty, timeout=5)
            with contextlib.suppress(Exception):
                await c.call(TASK, "Wait", shim_pb2.WaitRequest(id=s.task_id),
                             shim_pb2.WaitResponse, timeout=10)
            with contextlib.suppress(Exception):
                await c.call(TASK, "Delete", shim_pb2.DeleteRequest(id=s.task_id),
                             shim_pb2.DeleteResponse, timeout=10)
            with contextlib.suppress(Exception):
                await c.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id=s.task_id),
                             empty_pb2.Empty, timeout=3)
        finally:
            await c.close()


def _cleanup(binary: str | Path, s: Shim, grpc_address: str) -> None:
    asyncio.run(_teardown_task(s))
    if s.shim_pid:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and Path(f"/proc/{s.shim_pid}").exists():
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(s.shim_pid, signal.SIGKILL)
    subprocess.run(_shim_cmd(binary, s, grpc_address, "delete"), cwd=s.bundle,
                   capture_output=True, timeout=30)
    if s.address:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(s.address.removeprefix("unix://"))


def main() -> None:
    if os.geteuid() != 0 or not os.path.exists(GO_SHIM) or shutil.which("runc") is None:
        print("bench_shim: needs root, runc and /usr/bin/containerd-shim-runc-v2; skipped")
        return
    work = Path(tempfile.mkdtemp(prefix="kc-bench-shim-", dir="/tmp"))
    tag = uuid.uuid4().hex[:8]
    grpc_address = str(work / "containerd.sock")  # nothing listens: events are dropped
    ours = Shim("ours", f"kc-bench-{tag}", work / "ours")
    go = Shim("go-runc", f"runc-bench-{tag}", work / "go")
    _host_bundle(ours.bundle, ["sleep", "1000"])
    go.bundle.mkdir()
    _busybox_bundle(go.bundle, ["sleep", "1000"])
    results: dict[str, dict[str, float]] = {}
    stop = threading.Event()
    drains = [_log_fifo(ours.bundle, stop), _log_fifo(go.bundle, stop)]
    try:
        for binary, s in ((OUR_SHIM, ours), (GO_SHIM, go)):
            t0 = time.perf_counter()
            _start(binary, s, grpc_address)
            asyncio.run(_create_task(s))
            startup = time.perf_counter() - t0
            results[s.name] = asyncio.run(_measure(s))
            results[s.name]["start_create_ms"] = startup * 1e3
    finally:
        _cleanup(OUR_SHIM, ours, grpc_address)
        _cleanup(GO_SHIM, go, grpc_address)
        stop.set()
        for t in drains:
            t.join(2)
        shutil.rmtree(work, ignore_errors=True)
    a, b = results["ours"], results["go-runc"]
    print(f"Task.State over ttrpc, same Python client; sequential n={SEQUENTIAL}, "
          f"concurrent {CONCURRENT} in flight n={CONCURRENT_TOTAL}")
    print(f"{'metric':<18}{'ours':>12}{'go runc-v2':>12}{'ours/go':>10}")
    for key, label in (("p50_us", "p50 latency us"), ("p99_us", "p99 latency us"),
                       ("seq_rps", "seq req/s"), ("conc_rps", "conc req/s"),
                       ("rss_kib", "RSS KiB"), ("start_create_ms", "start+create ms")):
        ratio = a[key] / b[key] if b[key] else float("nan")
        print(f"{label:<18}{a[key]:>12.1f}{b[key]:>12.1f}{ratio:>10.2f}")


if __name__ == "__main__":
    main()
