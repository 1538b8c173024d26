"""SCHED_IDLE per vCPU TID where cpu.idle is missing (real cgroups and threads, root): with the
driver reporting no cpu.idle, an idle priority's vCPU threads run SCHED_IDLE and no cpu.idle is
written; moving a vCPU to a normal priority gives it SCHED_OTHER back; with cpu.idle present the
group is idle and the threads stay SCHED_OTHER."""
from __future__ import annotations

import os
import secrets

import pytest

from shim.config import ColoConfig
from shim.resources.qos import QosConfig, QosManager, detect_driver
from tests.support.cgroups import spawn_sleeper, tids

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)")]


def cfg(root: str, root_idle: bool = False) -> QosConfig:
    root_knobs = {"cpu_idle": True, "cpu_shares": 2} if root_idle else {}
    return QosConfig.from_colo(ColoConfig(cgroup_root=root, root=root_knobs, priorities={
        "high": {"cpu_shares": 1024}, "low": {"cpu_shares": 2, "cpu_idle": True}}))


@pytest.mark.parametrize("has_idle", [False, True])
def test_idle_priority(has_idle, monkeypatch):
    driver = detect_driver()
    monkeypatch.setattr(driver, "supports_idle", lambda rel: has_idle)
    root = f"kata-colo-test-{secrets.token_hex(3)}"
    proc = spawn_sleeper(4)
    mgr = QosManager("sb", cfg(root), driver=driver)
    try:
        t = tids(proc.pid)
        vcpus = {0: t[1], 1: t[2]}
        mgr.place(vcpus, proc.pid, ["high", "low"])
        policies = {v: os.sched_getscheduler(tid) for v, tid in vcpus.items()}
        idle_file = driver.read(mgr.priority_group("low"), "cpu.idle")
        if has_idle:
            assert policies == {0: os.SCHED_OTHER, 1: os.SCHED_OTHER}
            assert idle_file == "1"
        else:
            assert policies == {0: os.SCHED_OTHER, 1: os.SCHED_IDLE}
            assert idle_file == "0"
            mgr.set_vcpu_priority(1, "high")
            assert os.sched_getscheduler(vcpus[1]) == os.SCHED_OTHER
            mgr.set_vcpu_priority(0, "low")
            assert os.sched_getscheduler(vcpus[0]) == os.SCHED_IDLE
    finally:
        mgr.cleanup()
        proc.kill()
        proc.wait()
        driver.remove_tree(root, "")
    assert not driver.exists(root)


def test_idle_root_without_cpu_idle_makes_every_vcpu_sched_idle(monkeypatch):
    """cpu_idle on the offline root idles its whole subtree; without cpu.idle every vCPU of a
    sandbox below it runs SCHED_IDLE instead, and the root keeps only its shares."""
    driver = detect_driver()
    monkeypatch.setattr(driver, "supports_idle", lambda rel: False)
    root = f"kata-colo-test-{secrets.token_hex(3)}"
    proc = spawn_sleeper(4)
    mgr = QosManager("sb", cfg(root, root_idle=True), driver=driver)
    try:
        t = tids(proc.pid)
        mgr.place({0: t[1], 1: t[2]}, proc.pid, ["high", "low"])
        assert [os.sched_getscheduler(x) for x in t[1:3]] == [os.SCHED_IDLE, os.SCHED_IDLE]
        assert driver.read(root, "cpu.idle") == "0" and driver.read(root, "cpu.shares") == "2"
    finally:
        mgr.cleanup()
        proc.kill()
        proc.wait()
        driver.remove_tree(root, "")
