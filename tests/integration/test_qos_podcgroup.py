"""The pod cgroup resource against the host's real cgroups (root; no VM): a sleeper process stands
in for the shim. Its journal record names the directories before they exist; it joins the group
in every hierarchy, gets the memory limit, is moved back and the groups removed on teardown; a
kubelet-made parent is never removed; recover() from the record alone (the process killed, as
after kill -9) removes everything; the systemd spelling expands to slices."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ResourceError
from shim.config import ColoConfig, Config, HypervisorConfig
from shim.resources.manager import ResourceContext
from shim.resources.podcgroup.hierarchy import PodHierarchies
from shim.resources.podcgroup.resource import PodCgroupResource
from shim.resources.qos import QosManager, cgroupfs, detect_driver

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)")]
MIB = 1 << 20


def groups_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _h, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            out[c or "unified"] = path
    return out


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def hier():
    return PodHierarchies.detect()


@pytest.fixture
def top(hier):
    name = f"kc-test-pod-{secrets.token_hex(3)}"
    yield name
    for top_dir in (name, name.replace("-", "_") + ".slice"):
        for mp in hier.mounts:  # sweep whatever a failing test left
            dirs = [p for p in Path(mp).glob(f"{top_dir}/**") if p.is_dir()]
            for d in sorted(dirs, key=lambda p: -len(p.parts)):
                for pid in (d / "cgroup.procs").read_text().split():
                    (Path(mp) / "cgroup.procs").write_text(pid)
                d.rmdir()


def ctx(spec: dict, colo: ColoConfig, journal: list) -> ResourceContext:
    return ResourceContext(sandbox_id="sb1", state_dir=Path("/nonexistent"),
                        config=Config(hypervisor=HypervisorConfig(default_memory=512), colo=colo), spec=spec,
                        hypervisor=None)


async def test_cgroups_path_join_limit_teardown(hier, top, sleeper):
    spec = {"linux": {"cgroupsPath": f"/{top}/pod42/sb1", "resources": {"memory": {"limit": 1 << 30}}}}
    colo = ColoConfig(memory_overhead_mib=100)
    journal: list[dict] = []
    c = ctx(spec, colo, journal)
    res = PodCgroupResource.for_sandbox(c)
    assert res is not None and res.group == f"{top}/pod42/sb1" and res.offline_root is None
    res._process = sleeper.pid
    # kubelet made the pod cgroup already: only the sandbox level may be created (and removed)
    hier.create(f"{top}/pod42")

    existed: list[bool] = []

    def persist():
        rec = res.record()
        journal.append(rec)
        existed.extend(os.path.isdir(hier.dir(mp, rel)) for mp, rels in rec["created"].items() for rel in rels)

    c.persist = persist
    before = groups_of(sleeper.pid)
    await res.before_boot(c)
    assert journal[0]["created"] and all(rels == [f"{top}/pod42/sb1"] for rels in journal[0]["created"].values())
    assert existed and not any(existed[: len(journal[0]["created"])]), "a group existed before it was journaled"
    now = groups_of(sleeper.pid)
    for ctrl in ("cpu", "cpuacct", "cpuset", "memory", "pids"):
        assert now[ctrl] == f"/{top}/pod42/sb1", (ctrl, now)
    assert hier.memory_limit(f"{top}/pod42/sb1") == (1 << 30) + 100 * MIB
    assert res.record()["pid"] == sleeper.pid and res.record()["memory_limit"] == (1 << 30) + 100 * MIB
    await res.teardown()
    assert groups_of(sleeper.pid) == before
    assert not hier.exists(f"{top}/pod42/sb1") and hier.exists(f"{top}/pod42")


async def test_offline_root_knobs_and_recover_after_crash(hier, top, sleeper):
    colo = ColoConfig(cgroup_root=top, root={"cpu_shares": 2, "cpu_idle": True})
    c = ctx({}, colo, [])
    res = PodCgroupResource.for_sandbox(c)
    assert res is not None and res.group == f"{top}/sb1" and res.offline_root == top
    res._process = sleeper.pid
    records: list[dict] = []
    c.persist = lambda: records.append(res.record())
    await res.before_boot(c)
    driver = detect_driver()
    if driver.supports_idle(top):
        assert driver.read(top, "cpu.idle") == "1"
    # the QoS manager nests in the given group and leaves it alone on cleanup
    mgr = QosManager("sb1", _colo_with_prios(top), driver=driver, sandbox_group=f"{top}/sb1")
    mgr.place({0: sleeper.pid}, sleeper.pid, ["low"])
    assert groups_of(sleeper.pid)["cpu"] == f"/{top}/sb1/vcpu-low"
    # "kill -9": the process dies, nothing is torn down; recovery has only the journal
    sleeper.kill()
    sleeper.wait()
    await PodCgroupResource.recover(records[-1])
    assert not hier.exists(f"{top}/sb1") and not any(os.path.isdir(hier.dir(mp, top)) for mp in hier.mounts)


def _colo_with_prios(root: str) -> ColoConfig:
    return ColoConfig(cgroup_root=root, priorities={"low": {"cpu_shares": 2}})


async def test_systemd_path_expands_to_slices(hier, top, sleeper):
    slice_name = top.replace("-", "_")
    spec = {"linux": {"cgroupsPath": f"{slice_name}-besteffort-pod9.slice:cri-containerd:sb1"}}
    c = ctx(spec, ColoConfig(), [])
    res = PodCgroupResource.for_sandbox(c)
    assert res is not None
    want = (f"{slice_name}.slice/{slice_name}-besteffort.slice/{slice_name}-besteffort-pod9.slice/"
            "cri-containerd-sb1.scope")
    assert res.group == want
    res._process = sleeper.pid
    c.persist = lambda: None
    try:
        await res.before_boot(c)
        assert groups_of(sleeper.pid)["cpu"] == "/" + want
    finally:
        await res.teardown()
    assert not any(os.path.isdir(hier.dir(mp, f"{slice_name}.slice")) for mp in hier.mounts)


V2_MOUNT = cgroupfs.v2_mountpoint(cgroupfs.cgroup_mounts())


@pytest.mark.skipif(V2_MOUNT is None, reason="no cgroup2 hierarchy mounted")
def test_v2_structure_join_and_remove(sleeper):
    """cgroup v2 on the real unified hierarchy (on this v1 host it has no controllers: groups,
    process moves and removal are real; the memory limit needs the memory controller)."""
    assert V2_MOUNT is not None
    hier = PodHierarchies(2, {V2_MOUNT: frozenset()})
    group = f"kc-test-v2-{secrets.token_hex(3)}/pod/sb"
    created = hier.missing(group)
    assert created == {V2_MOUNT: [group.split("/")[0], group.rsplit("/", 1)[0], group]}
    origin = hier.location(sleeper.pid)
    try:
        hier.create(group)
        hier.set_memory_limit(group, None)  # unlimited needs nothing
        if not (Path(V2_MOUNT) / group / "memory.max").exists():
            with pytest.raises(ResourceError, match="memory controller"):
                hier.set_memory_limit(group, 1 << 30)
        hier.join(group, sleeper.pid)
        assert groups_of(sleeper.pid)["unified"] == "/" + group
        hier.move_back(sleeper.pid, origin)
        assert groups_of(sleeper.pid)["unified"] == "/" + origin[V2_MOUNT]
        hier.join(group, sleeper.pid)  # as after a crash: recovery empties the group into the root
    finally:
        hier.remove(created, evacuate=group)
    assert not (Path(V2_MOUNT) / group.split("/")[0]).exists()
    assert groups_of(sleeper.pid)["unified"] == "/"
