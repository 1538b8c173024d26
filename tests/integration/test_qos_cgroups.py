"""QosManager against the host's real cgroups (root): placement, knobs, pinning, live moves,
hotplug rebalance, cleanup (also stateless, after a "crash"), and a CPU-contention check that
the priorities really change who gets the CPU.

Every test uses its own root group kata-colo-test-<random>; the fixture moves leftover threads
back to the hierarchy root and removes children first, even when a test fails.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ConfigError, ResourceError
from shim.config import ColoConfig
from shim.resources.qos import QosConfig, QosManager, detect_driver, parse_vcpu_priorities, placement
from shim.resources.qos.driver import CgroupDriver
from tests.support.cgroups import spawn_sleeper, sweep, tids

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, sched_setaffinity of other tasks)"),
]

SPINNER_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;
static void *spin(void *a) {
    (void)a;
    pthread_mutex_lock(&out);
    printf("%ld\n", (long)syscall(SYS_gettid)); fflush(stdout);
    pthread_mutex_unlock(&out);
    volatile unsigned long x = 0;
    for (;;) x++;
    return NULL;
}
int main(void) {
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, spin, NULL);
    pause();
    return 0;
}
"""


def cgroup_of(pid: int, tid: int, controller: str) -> str:
    """The thread's group in the hierarchy holding ``controller`` ("" = the v2 hierarchy),
    read straight from /proc/<pid>/task/<tid>/cgroup."""
    for line in Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().splitlines():
        _hid, ctrls, path = line.split(":", 2)
        if (controller == "" and ctrls == "") or (controller and controller in ctrls.split(",")):
            return path.strip("/")
    raise AssertionError(f"thread {tid}: no {controller!r} hierarchy")


def controllers(driver: CgroupDriver) -> list[str]:
    return ["cpu", "cpuacct", "cpuset"] if driver.version == 1 else [""]


@pytest.fixture
def root_name() -> Iterator[str]:
    name = f"kata-colo-test-{secrets.token_hex(4)}"
    driver = detect_driver()
    try:
        yield name
    finally:
        sweep(driver, name)
        assert not driver.exists(name)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def colo(root: str, root_knobs: dict | None = None, **prios: dict) -> QosConfig:
    return QosConfig.from_colo(ColoConfig(cgroup_root=root, root=root_knobs or {}, priorities=prios))


PLACERS = ["python", pytest.param("cython", marks=pytest.mark.skipif(
    placement.cython_placer() is None, reason="shim._speedups.pinning not built (python3 setup.py build_ext)"))]


@pytest.mark.parametrize("impl", PLACERS)
def test_place_knobs_pin_move_cleanup(root_name: str, procs: list, impl: str) -> None:
    driver = detect_driver()
    cfg = colo(root_name, {"cpu_shares": 512},
               high={"cpu_shares": 4096, "cfs_quota_us": 50000, "cfs_period_us": 100000,
                     "cfs_burst_us": 90000, "cpuset": "0-1", "pin": True},
               low={"cpu_shares": 2, "cpuset": "1", "pin": True})
    proc = procs.append(spawn_sleeper(6)) or procs[-1]
    all_tids = tids(proc.pid)
    vcpus = {i: tid for i, tid in enumerate(all_tids[1:5])}
    prios = parse_vcpu_priorities("high:2,low:2", 4, cfg.priorities)
    mgr = QosManager("sb1", cfg, driver=driver, placer=placement.available_placers()[impl])
    mgr.place(vcpus, proc.pid, prios)
    sb = f"{root_name}/sb1"
    try:
        assert mgr.mapping() == {"high": [0, 1], "low": [2, 3]}
        for ctrl in controllers(driver):
            for vcpu, tid in vcpus.items():
                assert cgroup_of(proc.pid, tid, ctrl) == f"{sb}/vcpu-{prios[vcpu]}"
            for tid in set(all_tids) - set(vcpus.values()):
                assert cgroup_of(proc.pid, tid, ctrl) == f"{sb}/vmm"
        # pinning: high round-robins over 0-1, low sits on CPU 1
        assert [os.sched_getaffinity(vcpus[i]) for i in range(4)] == [{0}, {1}, {1}, {1}]
        if driver.version == 1:
            assert driver.read(root_name, "cpu.shares") == "512"
            assert driver.read(f"{sb}/vcpu-high", "cpu.shares") == "4096"
            assert driver.read(f"{sb}/vcpu-high", "cpu.cfs_quota_us") == "50000"
            assert driver.read(f"{sb}/vcpu-high", "cpu.cfs_period_us") == "100000"
            assert driver.read(f"{sb}/vcpu-high", "cpu.cfs_burst_us") == "50000"  # clamped to the quota
            assert driver.read(f"{sb}/vcpu-low", "cpu.shares") == "2"
            assert driver.read(f"{sb}/vcpu-low", "cpuset.cpus") == "1"
            assert driver.read(f"{sb}/vmm", "cpuset.cpus") == driver.read(root_name, "cpuset.cpus")
        else:
            assert driver.read(f"{sb}/vcpu-high", "cpu.weight") == "155"
            assert driver.read(f"{sb}/vcpu-high", "cpu.max") == "50000 100000"
        # live change: vCPU 3 becomes high → moves group and gets the next high CPU (k=2 → CPU 0)
        mgr.set_vcpu_priority(3, "high")
        assert cgroup_of(proc.pid, vcpus[3], "cpu" if driver.version == 1 else "") == f"{sb}/vcpu-high"
        assert mgr.mapping() == {"high": [0, 1, 3], "low": [2]}
        assert os.sched_getaffinity(vcpus[3]) == {0}
        # live knob change: shares and cpuset of "low", vCPU 2 follows to CPU 0
        mgr.update_priority_knobs("low", {"cpu_shares": 64, "cpuset": "0"})
        assert os.sched_getaffinity(vcpus[2]) == {0}
        if driver.version == 1:
            assert driver.read(f"{sb}/vcpu-low", "cpu.shares") == "64"
            assert driver.read(f"{sb}/vcpu-low", "cpuset.cpus") == "0"
        with pytest.raises(ConfigError, match="unknown vCPU priority"):
            mgr.set_vcpu_priority(0, "urgent")
        assert '"high": [0, 1, 3]' in mgr.guest_json()
    finally:
        removed = mgr.cleanup()
    assert f"{sb}/vcpu-high" in removed and sb in removed and root_name in removed
    assert not driver.exists(sb) and not driver.exists(root_name)
    for tid in all_tids:
        assert root_name not in Path(f"/proc/{proc.pid}/task/{tid}/cgroup").read_text()
    assert mgr.cleanup() == []  # idempotent


def test_rebalance_after_hotplug_and_crash_cleanup(root_name: str, procs: list) -> None:
    driver = detect_driver()
    ctrl = "cpu" if driver.version == 1 else ""
    cfg = colo(root_name, high={"cpu_shares": 1024}, low={"cpu_shares": 2})
    proc = procs.append(spawn_sleeper(6)) or procs[-1]
    t = tids(proc.pid)
    mgr = QosManager("sb2", cfg, driver=driver)
    mgr.place({0: t[1], 1: t[2]}, proc.pid, ["high", "low"])
    # hot-plug two vCPUs (existing threads stand in for the new vCPU threads)
    mgr.rebalance({0: t[1], 1: t[2], 2: t[3], 3: t[4]}, ["high", "high", "low", "low"])
    assert mgr.mapping() == {"high": [0, 1], "low": [2, 3]}
    assert cgroup_of(proc.pid, t[3], ctrl) == f"{root_name}/sb2/vcpu-low"
    assert cgroup_of(proc.pid, t[5], ctrl) == f"{root_name}/sb2/vmm"
    # hot-plug without explicit priorities: the new vCPU gets the lowest priority
    mgr.rebalance({0: t[1], 1: t[2], 2: t[3], 3: t[4], 4: t[5]})
    assert mgr.mapping() == {"high": [0, 1], "low": [2, 3, 4]}
    # unplug to 2 vCPUs, all high: former vCPU threads become VMM threads, vcpu-low goes away
    mgr.rebalance({0: t[1], 1: t[2]}, ["high", "high"])
    assert not driver.exists(f"{root_name}/sb2/vcpu-low")
    assert cgroup_of(proc.pid, t[3], ctrl) == cgroup_of(proc.pid, t[4], ctrl) == f"{root_name}/sb2/vmm"
    assert cgroup_of(proc.pid, t[2], ctrl) == f"{root_name}/sb2/vcpu-high"
    # persisted state → a fresh manager (the shim restarted) can release everything
    state = mgr.to_state()
    # ... or, with no state at all, the stateless crash cleanup by sandbox id
    removed = QosManager.cleanup_sandbox("sb2", root_name, driver)
    assert set(removed) == {f"{root_name}/sb2/vcpu-high", f"{root_name}/sb2/vmm", f"{root_name}/sb2"}
    assert QosManager.cleanup_sandbox("sb2", root_name, driver) == []
    assert all(f"{root_name}/" not in Path(f"/proc/{proc.pid}/task/{x}/cgroup").read_text() for x in t)
    again = QosManager.from_state(state, cfg, driver)
    assert again.cleanup() == [root_name]  # the groups are gone; the root it created is removed


def test_place_failure_leaves_nothing(root_name: str, procs: list) -> None:
    driver = detect_driver()
    cfg = colo(root_name, high={"cpu_shares": 1024})
    proc = procs.append(spawn_sleeper(2)) or procs[-1]
    mgr = QosManager("sb3", cfg, driver=driver)
    with pytest.raises(ResourceError, match="vCPU 0 thread 999999999"):
        mgr.place({0: 999_999_999}, proc.pid, ["high"])  # no such thread
    assert not driver.exists(root_name)
    assert root_name not in Path(f"/proc/{proc.pid}/cgroup").read_text()


def _cc_spinner(tmp: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, exe = tmp / "spin.c", tmp / "spin"
    src.write_text(SPINNER_C)
    subprocess.run([cc, "-O0", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def schedstat_ns(pid: int, tid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("low_knobs", [{"cpu_shares": 2}, {"cpu_idle": True}], ids=["shares2", "idle"])
def test_contention_high_beats_low(root_name: str, procs: list, tmp_path: Path, low_knobs: dict) -> None:
    exe = _cc_spinner(tmp_path)
    if exe is None:
        pytest.skip("no C compiler for the GIL-free busy-spinning helper")
    driver = detect_driver()
    cfg = colo(root_name, {"cpu_shares": 1024},
               high={"cpu_shares": 8192, "cpuset": "0", "pin": True},
               low={**low_knobs, "cpuset": "0", "pin": True})
    proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None
    spinners = [int(proc.stdout.readline()), int(proc.stdout.readline())]
    mgr = QosManager("sb4", cfg, driver=driver)
    mgr.place({0: spinners[0], 1: spinners[1]}, proc.pid, ["high", "low"])
    try:
        assert os.sched_getaffinity(spinners[0]) == os.sched_getaffinity(spinners[1]) == {0}
        start = [schedstat_ns(proc.pid, t) for t in spinners]
        usage0 = [driver.cpu_usage_ns(mgr.priority_group(p)) for p in ("high", "low")]
        time.sleep(3)
        end = [schedstat_ns(proc.pid, t) for t in spinners]
        usage1 = [driver.cpu_usage_ns(mgr.priority_group(p)) for p in ("high", "low")]
    finally:
        proc.kill()
        proc.wait()
        mgr.cleanup()
    high, low = end[0] - start[0], end[1] - start[1]
    assert high > 0.2e9, f"high got only {high} ns of 3 s"
    ratio = high / max(low, 1)
    assert ratio > 3, f"high got {high} ns, low {low} ns (ratio {ratio:.1f})"
    group_ratio = (usage1[0] - usage0[0]) / max(usage1[1] - usage0[1], 1)
    assert group_ratio > 3, f"group usage ratio {group_ratio:.1f}"
