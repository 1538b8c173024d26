"""Co-location end to end below containerd: a 4-vCPU QEMU (TCG) guest, its vCPU threads placed
by QosManager (high:2,low:2) under a private host cgroup root, SetVcpuPriorities to the agent,
then containers annotated with a container-priority run only on their priority's vCPUs.
Everything (qemu, host cgroups, temp dirs) is removed even when an assertion fails."""
from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from shim.config import ANNOTATION_CONTAINER_PRIORITY, ColoConfig
from common.errors import InvalidArgument
from agent_api.client.facade import GuestAgent
from shim.resources.qos import QosConfig, QosManager, detect_driver
from shim.backend import BackendContext
from shim.sandbox import SandboxBackend
from tests.integration.test_agent_host import read_all
from tests.integration.test_qos_cgroups import _sweep
from tests.integration.test_vm_agent import IMAGE, booted_vm, container

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


async def test_vcpu_priorities_host_and_guest():
    root = f"kata-colo-test-{secrets.token_hex(4)}"
    driver = detect_driver()
    qos = QosConfig.from_colo(ColoConfig(cgroup_root=root, priorities={"high": {}, "low": {}}))
    manager = None
    try:
        async with booted_vm(4, "kccolo") as vm:
            state, shared, hv, guest, qemu_pid = vm.state, vm.shared, vm.hv, vm.guest, vm.qemu_pid
            manager = QosManager(state.name, qos, driver)
            # host: vCPU 0-1 in vcpu-high, 2-3 in vcpu-low, every other qemu thread in vmm
            threads = await hv.vcpu_threads()
            assert sorted(threads) == [0, 1, 2, 3]
            await asyncio.to_thread(manager.place, threads, qemu_pid, ["high", "high", "low", "low"])
            assert manager.mapping() == {"high": [0, 1], "low": [2, 3]}
            base = f"/{root}/{state.name}"
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
            await guest.set_vcpu_priorities(manager.mapping())
            assert await cpus_allowed(guest, shared, "c-low", "low") == "2-3"
            assert await cpus_allowed(guest, shared, "c-high", "high") == "0-1"
            assert await cpus_allowed(guest, shared, "c-default", None) == "0-3"
            # live change through the sandbox's ops API: vCPU 3 becomes high, low's shares change
            sandbox = SandboxBackend.__new__(SandboxBackend)
            sandbox.ctx = BackendContext(namespace="default", sandbox_id=state.name, state_dir=str(state))
            sandbox.qos, sandbox.agent, sandbox._vm_gone = manager, guest, asyncio.Event()
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
            await guest.client.destroy_sandbox()
    finally:
        if manager is not None:
            await asyncio.to_thread(manager.cleanup)
        _sweep(driver, root)
    assert not os.path.exists(f"/proc/{qemu_pid}")
    assert not driver.exists(root)
    assert not state.exists()
