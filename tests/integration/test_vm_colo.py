"""Co-location end to end below containerd: a Sandbox booting a 4-vCPU QEMU (TCG) guest from a
config + annotations, its vCPU threads placed by the QoS resource (high:2,low:2) under a private
host cgroup root, SetVcpuPriorities to the agent, then containers annotated with a
container-priority run only on their priority's vCPUs. Everything (qemu, host cgroups, the
share, the journal) is removed even when an assertion fails."""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from agent_api.client.facade import GuestAgent
from common.errors import InvalidArgument
from shim.backend import BackendContext, CreateOpts, Stdio
from shim.config import ANNOTATION_CONTAINER_PRIORITY, ANNOTATION_HV_PREFIX, ANNOTATION_VCPU_PRIORITIES
from shim.resources.qos import detect_driver
from shim.sandbox.sandbox import Sandbox
from tests.support.agent import read_all
from tests.support.booted_vm import IMAGE, container
from tests.support.cgroups import sweep

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)"),
              pytest.mark.skipif(not (IMAGE / "manifest.json").exists(), reason="guest image not built")]


def cgroup_paths(pid: int, tid: int) -> list[str]:
    """cgroup paths of a thread, one per hierarchy line of /proc/<pid>/task/<tid>/cgroup."""
    text = Path(f"/proc/{pid}/task/{tid}/cgroup").read_text()
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


async def cpus_allowed(guest: GuestAgent, shared: Path, cid: str, priority: str | None) -> str:
    spec = container(shared, cid, ["grep", "Cpus_allowed_list", "/proc/self/status"])
    if priority is not None:
        spec.Annotations[ANNOTATION_CONTAINER_PRIORITY] = priority
    client = guest.client
    await client.create_container(cid, spec)
    await client.start_container(cid)
    out = (await read_all(client, cid)).decode()
    assert await client.wait_process(cid) == 0, out
    await client.remove_container(cid)
    return out.split(":", 1)[1].strip()


async def test_vcpu_priorities_host_and_guest(tmp_path):
    """Through the Sandbox handle (the one the management server uses): config + annotations →
    QoS resource placed after boot → live changes."""
    root = f"kata-colo-test-{secrets.token_hex(4)}"
    driver = detect_driver()
    conf = tmp_path / "configuration.toml"
    conf.write_text(f'[hypervisor.qemu]\nenable_annotations = ["default_vcpus"]\n'
                    f'[colo]\ncgroup_root = "{root}"\n[colo.priorities.high]\n[colo.priorities.low]\n')
    sid = f"kccolo-{secrets.token_hex(3)}"
    state = Path("/run/kata-colo/sbs") / sid
    sandbox = Sandbox(BackendContext(namespace="default", sandbox_id=sid, state_dir=str(state)))
    spec = {"process": {"args": ["true"]}, "hostname": "kccolo",
            "annotations": {ANNOTATION_VCPU_PRIORITIES: "high:2,low:2",
                            ANNOTATION_HV_PREFIX + "default_vcpus": "4"}}
    qemu_pid = 0
    try:
        await sandbox.start(CreateOpts(id=sid, bundle="", spec=spec, stdio=Stdio(), config_path=str(conf)))
        hv, guest = sandbox.hv, sandbox.require_agent()
        assert hv is not None
        qemu_pid = sandbox.vmm_pid() or 0
        shared = sandbox.resource("sharefs").share.host_dir
        manager = sandbox.resource("qos").manager
        # host: vCPU 0-1 in vcpu-high, 2-3 in vcpu-low, every other qemu thread in vmm
        threads = await hv.vcpu_threads()
        assert sorted(threads) == [0, 1, 2, 3]
        assert manager.mapping() == {"high": [0, 1], "low": [2, 3]}
        base = f"/{root}/{sid}"
        for vcpu, tid in threads.items():
            want = f"{base}/vcpu-{'high' if vcpu < 2 else 'low'}"
            assert want in cgroup_paths(qemu_pid, tid), (vcpu, cgroup_paths(qemu_pid, tid))
        others = [int(t) for t in os.listdir(f"/proc/{qemu_pid}/task") if int(t) not in threads.values()]
        assert others
        for tid in others:
            assert f"{base}/vmm" in cgroup_paths(qemu_pid, tid), (tid, cgroup_paths(qemu_pid, tid))

        # guest: one cpuset group per priority; containers follow their annotation
        with pytest.raises(InvalidArgument):
            await guest.set_vcpu_priorities({"high": [0, 1], "low": [1, 7]})
        assert await cpus_allowed(guest, shared, "c-low", "low") == "2-3"
        assert await cpus_allowed(guest, shared, "c-high", "high") == "0-1"
        assert await cpus_allowed(guest, shared, "c-default", None) == "0-3"
        # live changes through the sandbox's ops API: vCPU 3 becomes high, low's shares change
        assert await sandbox.set_vcpu_priority(3, "high") == {"high": [0, 1, 3], "low": [2]}
        assert f"{base}/vcpu-high" in cgroup_paths(qemu_pid, threads[3])
        assert await cpus_allowed(guest, shared, "c-high2", "high") == "0-1,3"
        await sandbox.update_priority_knobs("low", {"cpu_shares": 64})
        if Path("/sys/fs/cgroup/cpu/cpu.shares").exists():
            assert Path(f"/sys/fs/cgroup/cpu{base}/vcpu-low/cpu.shares").read_text().strip() == "64"
        bad = container(shared, "c-bad", ["true"])
        bad.Annotations[ANNOTATION_CONTAINER_PRIORITY] = "batch"
        with pytest.raises(InvalidArgument):
            await guest.client.create_container("c-bad", bad)
    finally:
        await sandbox.stop()
        sweep(driver, root)
        shutil.rmtree(state, ignore_errors=True)
    assert qemu_pid and not os.path.exists(f"/proc/{qemu_pid}")
    assert not driver.exists(f"{root}/{sid}")
    assert not (state / "shared").exists() and not (state / "resources.json").exists()
