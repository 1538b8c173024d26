"""The shim killed (SIGKILL) at several points of a sandbox boot, with real containerd and QEMU,
then containerd's cleanup (`ctr task rm -f`, `ctr container rm`: containerd runs the shim's
``delete``) must leave nothing: no qemu, no tap, no ingress qdisc or tc filter in the pod netns,
no cgroup of the sandbox in any hierarchy (every v1 controller and v2 unified), no mount under
the sandbox state dir or the bundle, no shim socket, no state dir.

The pod has a CNI-like netns (``--with-ns network:``) and vCPU priorities (``high:1,low:1`` on
2 vCPUs), so the boot makes every kind of host object. The kill points are exact: the sandbox
journals before each step, and :class:`~tests.support.open_gate.OpenGate` holds the shim in the
``open(2)`` of its next journal version, so "killed right after the tap was made, while the
journal still says *planned*" is the state at the kill every time. What existed at the kill is
recorded and asserted, so the test cannot pass without exercising its point.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import netns
from tests.support.cgroups import groups_named
from tests.support.containerd import (
    IMAGE,
    RUNTIME,
    STATE_ROOT,
    Containerd,
    assert_nothing_left,
    qemu_pids,
    shim_processes,
)
from tests.support.journal import Journal, kinds, read_journal
from tests.support.open_gate import OpenGate

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]

NETNS = "kc-e2e-crash"
HOST_IF = "kce2e-c"
HOST_IP, POD_IP = "10.251.8.1", "10.251.8.2"
TAP = "tap0_kata"
COLO_ROOT = "default"  # ctr's cgroupsPath /<namespace>/<id>: the sandbox (pod) group, sandbox_cgroup_only
BOOTING_DELAY = 1.5  # after qemu started, well before the TCG guest's agent answers (≈ 6 s)


def observe(c: Containerd, cid: str) -> dict[str, Any]:
    """Every host object of the sandbox that exists now."""
    state = STATE_ROOT / cid
    tc = netns.tc_leftovers(NETNS)
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()
              if f"/{cid}/" in ln.split()[1] or ln.split()[1].endswith(f"/{cid}")]
    seen = {
        "qemu": qemu_pids(cid),
        "tap": TAP in netns.links(NETNS),
        "ingress qdisc": tc["ingress qdisc"],
        "filters": tc["filters"],
        "cgroups": groups_named(f"{COLO_ROOT}/{cid}"),
        "qos cgroups": groups_named(f"{COLO_ROOT}/{cid}/vcpu-high"),
        "mounts": mounts,
        "vm dir": (state / "vm").exists(),
        "state dir": state.exists(),
        "journal": kinds(read_journal(state)),
        "shim": [ln for ln in shim_processes(str(c.dir)) if f"-id {cid} " in ln],
    }
    return {k: v for k, v in seen.items() if v}


# -- the journal states the kill points wait for --------------------------------------------------

def record(journal: Journal, kind: str) -> dict[str, Any] | None:
    return next((dict(e.get("record") or {}) for e in journal if e.get("kind") == kind), None)


def attachments(journal: Journal) -> list[dict[str, Any]]:
    """The tc-filter attachments the network entry names."""
    net = (record(journal, "network") or {}).get("net")
    return list(json.loads(net).get("attachments", [])) if net else []


def tap_planned(journal: Journal) -> bool:
    return any(a.get("planned") for a in attachments(journal))


def tap_done(journal: Journal) -> bool:
    return bool(attachments(journal)) and not tap_planned(journal)


def vm_journaled(journal: Journal) -> bool:
    return record(journal, "vm") is not None


def qos_placing(journal: Journal) -> bool:
    return bool((record(journal, "qos") or {}).get("state"))


def qemu_started(cid: str) -> bool:
    return bool(qemu_pids(cid))


@dataclass(frozen=True)
class Point:
    """``journal``: the shim is held writing the journal version after the first one matching
    it (so the step that followed that version is done, and nothing after it). ``host``: polled,
    then ``delay``. ``present``/``absent``: host objects that must (not) exist at the kill."""

    present: frozenset[str]
    absent: frozenset[str] = frozenset()
    journal: Callable[[Journal], bool] | None = None
    host: Callable[[str], bool] | None = None
    delay: float = 0.0


POINTS: dict[str, Point] = {
    # the tap and its filters are made, the journal still says "planned" (recovery tries all)
    "tap made, journaled as planned": Point(frozenset({"tap", "ingress qdisc", "filters"}),
                                            frozenset({"qemu", "vm dir"}), journal=tap_planned),
    "tap made and journaled": Point(frozenset({"tap", "ingress qdisc", "filters"}),
                                    frozenset({"qemu", "vm dir"}), journal=tap_done),
    # journaled (pid 0) before the VMM started; held once it runs, before its pid is journaled
    # the pod cgroup exists before the VMM is spawned (the shim joins it first); the QoS groups
    # inside it only after the vCPUs are placed
    "qemu started": Point(frozenset({"tap", "filters", "qemu", "vm dir", "cgroups"}), frozenset({"qos cgroups"}),
                          journal=vm_journaled),
    "agent not answering yet": Point(frozenset({"tap", "filters", "qemu", "cgroups"}), frozenset({"qos cgroups"}),
                                     host=qemu_started, delay=BOOTING_DELAY),
    # the QoS groups are journaled before they are made; held once the vCPUs are placed
    "cgroups exist": Point(frozenset({"tap", "filters", "qemu", "cgroups", "qos cgroups", "mounts"}),
                           journal=qos_placing),
}


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pod_netns() -> Iterator[str]:
    with netns.cni_netns(NETNS, host_if=HOST_IF, pod_ip=POD_IP, gw_ip=HOST_IP) as path:
        yield path


def ctr_run(c: Containerd, path: str, cid: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ctr", "-a", c.address, "-n", c.namespace, "run", "-d", "--runtime", RUNTIME,
         "--with-ns", f"network:{path}",
         "--annotation", "io.katacontainers.config.hypervisor.default_vcpus=2",
         "--annotation", "io.katacontainers.colo.vcpu-priorities=high:1,low:1",
         IMAGE, cid, "sleep", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def serve_pid(c: Containerd, cid: str, run: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The shim daemon (``serve``) of ``cid``, as soon as it exists."""
    deadline = time.monotonic() + timeout
    while True:
        serve = [int(ln.split()[0]) for ln in shim_processes(str(c.dir))
                 if f"-id {cid} " in ln and ln.endswith("serve")]
        if serve:
            assert len(serve) == 1, shim_processes(str(c.dir))
            return serve[0]
        assert run.poll() is None, f"ctr run ended before the shim started: {run.communicate()}"
        assert time.monotonic() < deadline, "the shim never started"
        time.sleep(0.002)


def wait_dir(path: Path, run: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert run.poll() is None and time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.001)


def kill_at_journal(c: Containerd, cid: str, shim: int, run: subprocess.Popen[bytes],
                    matches: Callable[[Journal], bool]) -> tuple[dict[str, Any], Journal]:
    """Step the shim through its journal writes; at the first published version that
    ``matches``, kill it while it is held writing the next one."""
    state = STATE_ROOT / cid
    wait_dir(state, run)
    with OpenGate(state, shim) as gate:
        first = True
        while True:
            held = gate.next(timeout=90)
            journal = read_journal(state)
            if first:  # the gate must see the boot from its first steps, or points may be missed
                assert len(journal) <= 1, f"gate installed too late: {kinds(journal)}"
                first = False
            if matches(journal):
                at_kill = observe(c, cid)
                os.kill(shim, signal.SIGKILL)
                assert read_journal(state) == journal      # it could not move on
                return at_kill, journal
            gate.release(held)


def kill_at_host(c: Containerd, cid: str, shim: int, run: subprocess.Popen[bytes], point: Point,
                 ) -> tuple[dict[str, Any], Journal]:
    assert point.host is not None
    deadline = time.monotonic() + 90
    while not point.host(cid):
        assert run.poll() is None, f"ctr run ended early: {run.communicate()}"
        assert time.monotonic() < deadline, f"never happened: {observe(c, cid)}"
        time.sleep(0.005)
    time.sleep(point.delay)
    os.kill(shim, signal.SIGSTOP)  # what we see now is what existed at the kill
    at_kill, journal = observe(c, cid), read_journal(STATE_ROOT / cid)
    os.kill(shim, signal.SIGKILL)
    return at_kill, journal


def containerd_cleanup(c: Containerd, cid: str) -> None:
    c.ctr("task", "rm", "-f", cid, check=False, timeout=60)
    c.ctr("container", "rm", cid, check=False, timeout=60)


def assert_all_gone(c: Containerd, cid: str, before_netns: str) -> None:
    assert_nothing_left(c, cid)  # qemu, state dir, mounts, shim socket (waits for them)
    deadline = time.monotonic() + 5
    while (left := observe(c, cid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == {}, f"left behind for {cid}: {left}"
    assert netns.snapshot(NETNS) == before_netns          # the netns is as CNI left it


# -- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(POINTS))
def test_shim_killed_during_boot_leaves_nothing(kata_containerd: Containerd, pod_netns: str, name: str):
    c, point = kata_containerd, POINTS[name]
    cid = f"kc-crash-{list(POINTS).index(name)}"
    before = netns.snapshot(NETNS)
    run = ctr_run(c, pod_netns, cid)
    try:
        shim = serve_pid(c, cid, run)
        if point.journal is not None:
            at_kill, journal = kill_at_journal(c, cid, shim, run, point.journal)
        else:
            at_kill, journal = kill_at_host(c, cid, shim, run, point)
        out, err = run.communicate(timeout=60)
        assert run.returncode != 0, (out, err)             # Create never completed
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        containerd_cleanup(c, cid)
    print(f"{name}: at the kill {sorted(at_kill)}, journal {kinds(journal)}")
    assert point.present <= at_kill.keys(), f"at the kill ('{name}'): {at_kill}"
    assert not point.absent & at_kill.keys(), f"at the kill ('{name}'): {at_kill}"
    if name == "tap made, journaled as planned":
        assert [a["tap_name"] for a in attachments(journal)] == [TAP]
    if name == "cgroups exist":
        assert len(at_kill["cgroups"]) >= 3, at_kill        # cpu, cpuacct, cpuset (v1)
    assert_all_gone(c, cid, before)


def test_shim_killed_while_running_leaves_nothing(kata_containerd: Containerd, pod_netns: str):
    """After Create returned (state.json written): delete recovers from it and the journal."""
    c = kata_containerd
    cid = "kc-crash-running"
    before = netns.snapshot(NETNS)
    run = ctr_run(c, pod_netns, cid)
    try:
        shim = serve_pid(c, cid, run)
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, (out, err)
        os.kill(shim, signal.SIGSTOP)
        at_kill = observe(c, cid)
        os.kill(shim, signal.SIGKILL)
    finally:
        containerd_cleanup(c, cid)
    assert {"qemu", "tap", "filters", "cgroups", "mounts"} <= at_kill.keys(), at_kill
    assert_all_gone(c, cid, before)
