"""kata-colo-resourced against real cgroups (root; no VM): a CPU burner stands in for an offline
VM (in a child group, so the v1 cpuset ordering of a subtree is exercised), two burners make an
online burst. The daemon (a real subprocess with a policy file) must shrink the offline cpuset
within 1 s of the burst, give it back after (the daemon's node is a test subtree: other load on
this shared host is not part of it), export the numbers on /metrics, restore everything
on SIGTERM; with --dry-run it writes nothing."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shim.resources.qos import cgroupfs, detect_driver
from shim.resources.qos.model import CpuKnobs, format_cpuset

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)"),
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")]
BURN = "import os\nwhile True: pass\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def groups():
    driver = detect_driver()
    tag = secrets.token_hex(3)
    node = f"kc-test-node-{tag}"  # the daemon's node: the load of other processes on the host is not ours
    online, offline = f"{node}/online", f"{node}/offline"
    for g in (node, online, offline, f"{offline}/vm"):
        driver.create(g)
    driver.set_knobs(offline, CpuKnobs(cpu_idle=True))  # as the shim's shipped [colo.root] does
    procs: list[subprocess.Popen] = []
    yield driver, online, offline, procs
    for p in procs:
        p.kill()
        p.wait()
    driver.remove_tree(node, "")


def spawn_in(driver, group: str, procs: list) -> subprocess.Popen:
    files = driver.attach_files(group)

    def enter() -> None:
        for f in files:
            cgroupfs.write_value(f, os.getpid())

    p = subprocess.Popen([sys.executable, "-c", BURN], preexec_fn=enter)
    procs.append(p)
    return p


def start_daemon(tmp_path: Path, online: str, offline: str, port: int, *extra: str) -> subprocess.Popen:
    policy = tmp_path / "resourced.toml"
    node = online.split("/")[0]
    policy.write_text(f'[daemon]\ninterval_ms = 100\nlisten = "127.0.0.1:{port}"\nnode_cgroup = "{node}"\n'
                      f'[tiers]\nonline = ["{online}"]\noffline = ["{offline}"]\n'
                      f'[cpu]\npolicy = "cpuset"\nrelax_delay_ms = 300\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "resourced", "--policy", str(policy), "--log-level", "debug", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(fn, timeout: float, step: float = 0.01, on_fail=lambda: "") -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s; daemon log:\n{on_fail()}")


def stop(d: subprocess.Popen) -> str:
    d.send_signal(signal.SIGTERM)
    return d.communicate(timeout=10)[0].decode()


def cpus(driver, group: str) -> str:
    return cgroupfs.read_value(os.path.join(driver.mountpoints["cpuset"], group, "cpuset.cpus"))


def test_suppress_within_a_second_and_give_back(tmp_path, groups):
    driver, online, offline, procs = groups
    full = format_cpuset(cgroupfs.online_cpus())
    spawn_in(driver, f"{offline}/vm", procs)
    spawn_in(driver, f"{offline}/vm", procs)
    port = free_port()
    d = start_daemon(tmp_path, online, offline, port)
    try:
        wait_for(lambda: cpus(driver, offline) == full, 10, on_fail=lambda: stop(d))
        time.sleep(0.5)
        burst = [spawn_in(driver, online, procs) for _ in range(2)]
        reaction = wait_for(lambda: cpus(driver, offline) != full, 5, on_fail=lambda: stop(d))
        assert reaction < 1.0, reaction
        shrunk = cpus(driver, offline)
        assert len(shrunk.split(",")) == 1 and "-" not in shrunk  # one CPU
        assert cpus(driver, f"{offline}/vm") == shrunk            # the whole subtree follows (v1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        usage = 'kata_colo_resourced_cpu_usage_cores{tier="online"}'
        online_line = next(x for x in text.splitlines() if x.startswith(usage))
        assert float(online_line.split()[-1]) > 0.5  # two burners, sharing the CPUs with the offline ones
        assert "kata_colo_resourced_offline_cpuset_cpus 1.0" in text
        assert 'kata_colo_resourced_decisions_total{action="SetCpuset",policy="cpu"}' in text
        for p in burst:
            p.kill()
            p.wait()
        back = wait_for(lambda: cpus(driver, offline) == full, 5, on_fail=lambda: stop(d))
        assert back < 3.0, back
        assert cpus(driver, f"{offline}/vm") == full
    finally:
        out = stop(d) if d.returncode is None else ""
    assert d.returncode == 0, out
    assert "capacity" in out and "set cpuset.cpus" in out
    assert cpus(driver, offline) == full


def test_dry_run_writes_nothing(tmp_path, groups):
    driver, online, offline, procs = groups
    full = format_cpuset(cgroupfs.online_cpus())
    spawn_in(driver, f"{offline}/vm", procs)
    d = start_daemon(tmp_path, online, offline, free_port(), "--dry-run")
    try:
        time.sleep(0.8)
        for _ in range(2):
            spawn_in(driver, online, procs)
        time.sleep(1.5)
        assert cpus(driver, offline) == full
    finally:
        d.send_signal(signal.SIGTERM)
        out = d.communicate(timeout=10)[0].decode()
    assert d.returncode == 0, out
    assert "would set cpuset.cpus=" in out
