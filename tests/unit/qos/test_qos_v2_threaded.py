"""The v2 driver's threaded-mode logic on a real cgroup2 hierarchy.

A private `mount -t cgroup2` shows the same single v2 hierarchy as /sys/fs/cgroup/unified, so the
test uses a cgroup2 mount that exists (on this v1/hybrid host: /sys/fs/cgroup/unified, with no
controllers: every CPU controller is bound to v1). Group creation, cgroup.type=threaded, process
adoption into the domain group, per-thread placement via cgroup.threads, moving the process back
and removal are all real; only knob writes need the cpu/cpuset controllers and are skipped when
the hierarchy has none.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ResourceError
from shim.config import ColoConfig
from shim.resources.qos import QosConfig, QosManager
from shim.resources.qos.cgroup_v2 import V2Driver
from shim.resources.qos.cgroupfs import cgroup_mounts, v2_mountpoint
from shim.resources.qos.model import CpuKnobs

SLEEPER = """
import sys, threading, time
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""

MOUNT = v2_mountpoint(cgroup_mounts())
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups"),
    pytest.mark.skipif(MOUNT is None, reason="no cgroup2 hierarchy mounted"),
]


@pytest.fixture
def driver() -> V2Driver:
    assert MOUNT is not None
    return V2Driver(MOUNT)


@pytest.fixture
def root(driver: V2Driver) -> Iterator[str]:
    name = f"kata-colo-test-{secrets.token_hex(4)}"
    yield name
    driver.remove_tree(name, "")
    assert not driver.exists(name)


@pytest.fixture
def proc() -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", SLEEPER, "6"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    while len(os.listdir(f"/proc/{p.pid}/task")) < 6:
        time.sleep(0.01)
    yield p
    p.kill()
    p.wait()


def v2_group(pid: int, tid: int) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].strip("/")
    raise AssertionError("no v2 line")


def test_threaded_layout_placement_and_cleanup(driver: V2Driver, root: str, proc: subprocess.Popen[str]) -> None:
    cfg = QosConfig.from_colo(ColoConfig(cgroup_root=root, root={}, priorities={"high": {}, "low": {}}))
    tids = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
    vcpus = {0: tids[1], 1: tids[2], 2: tids[3], 3: tids[4]}
    origin = v2_group(proc.pid, proc.pid)
    mgr = QosManager("sb", cfg, driver=driver)
    mgr.place(vcpus, proc.pid, ["high", "high", "low", "low"])
    try:
        sb = f"{root}/sb"
        assert driver.group_type(sb) == "domain threaded"  # the threaded root holding the process
        for child in ("vmm", "vcpu-high", "vcpu-low"):
            assert driver.group_type(f"{sb}/{child}") == "threaded"
        assert [int(x) for x in driver.read(sb, "cgroup.procs").split()] == [proc.pid]
        for i, tid in vcpus.items():
            assert v2_group(proc.pid, tid) == f"{sb}/vcpu-{'high' if i < 2 else 'low'}"
        for tid in (tids[0], tids[5]):
            assert v2_group(proc.pid, tid) == f"{sb}/vmm"
        assert driver.threads(f"{sb}/vcpu-low") == sorted([tids[3], tids[4]])
        mgr.set_vcpu_priority(2, "high")  # a live move inside the threaded subtree
        assert v2_group(proc.pid, tids[3]) == f"{sb}/vcpu-high"
        # a thread cannot leave the threaded subtree alone: the kernel refuses, we report it
        with pytest.raises(ResourceError, match="cannot write"):
            from shim.resources.qos.cgroupfs import write_value
            write_value(os.path.join(MOUNT or "", "cgroup.threads"), tids[3])
    finally:
        mgr.cleanup()
    assert not driver.exists(f"{root}/sb") and not driver.exists(root)
    assert {v2_group(proc.pid, t) for t in tids} == {origin}


def test_stateless_cleanup_moves_the_process_out(driver: V2Driver, root: str, proc: subprocess.Popen[str]) -> None:
    cfg = QosConfig.from_colo(ColoConfig(cgroup_root=root, root={}, priorities={"low": {}}))
    tids = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
    QosManager("sb2", cfg, driver=driver).place({0: tids[1]}, proc.pid, ["low"])  # then "crash"
    assert v2_group(proc.pid, tids[1]) == f"{root}/sb2/vcpu-low"
    removed = QosManager.cleanup_sandbox("sb2", root, driver)
    assert set(removed) == {f"{root}/sb2/vcpu-low", f"{root}/sb2/vmm", f"{root}/sb2"}
    assert {v2_group(proc.pid, t) for t in tids} == {""}


def test_knob_writes(driver: V2Driver, root: str) -> None:
    driver.create(root)
    if "cpu" not in driver.controllers(root):
        with pytest.raises(ResourceError, match="controller 'cpu' is not enabled"):
            driver.set_knobs(root, CpuKnobs(cpu_shares=1024))
        pytest.skip(f"cgroup2 at {MOUNT} has no cpu controller (bound to cgroup v1 on this host); "
                    "knob values are covered by test_v2_knob_rendering_order")
    driver.create(f"{root}/sb")
    driver.create(f"{root}/sb/vcpu-high", threaded=True)
    driver.set_knobs(f"{root}/sb/vcpu-high", CpuKnobs(cpu_shares=1024, cfs_quota_us=50000, cfs_period_us=100000))
    assert driver.read(f"{root}/sb/vcpu-high", "cpu.weight") == "39"
    assert driver.read(f"{root}/sb/vcpu-high", "cpu.max") == "50000 100000"
