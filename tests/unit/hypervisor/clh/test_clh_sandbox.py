"""The sandbox (shim.sandbox.sandbox.Sandbox) running Cloud Hypervisor through the registry, with
the fake VMM as the binary and a minimal agent fake that really dials the hybrid vsock the driver
names: the same code path as QEMU, journaled and recoverable, and a missing binary or a 9p
share refused with nothing left. The sandbox code itself names no driver."""
from __future__ import annotations

import ast
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from clh_testlib import FAKE_CLH, FakeVmm

import shim
from agent_api.client.transport import connect_hvsock
from common.errors import InvalidArgument
from hypervisor.base import AgentAddress
from hypervisor.clh.driver import CloudHypervisor
from shim.backend import BackendContext, CreateOpts, Stdio
from shim.config import ANNOTATION_VCPU_PRIORITIES
from shim.sandbox import sandbox as sandbox_mod
from shim.sandbox.sandbox import Sandbox, State


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def vcpu_cgroup_dirs(tid: int) -> set[str]:
    """The cgroup paths (any hierarchy) thread ``tid`` is in."""
    with open(f"/proc/{tid}/cgroup", encoding="utf-8") as f:
        return {line.strip().split(":", 2)[2] for line in f if line.strip()}


class HvsockAgent:
    """Just enough of GuestAgent for Sandbox.start/stop: connects over the hybrid vsock
    (CONNECT <port> → OK, as CH answers) and records CreateSandbox."""

    instances: list[HvsockAgent] = []

    def __init__(self, address: AgentAddress) -> None:
        self.address = address
        self.created: dict[str, Any] = {}
        self.closed = False
        HvsockAgent.instances.append(self)

    async def connect(self, timeout: float, vm_gone: Any) -> None:
        assert self.address.transport == "hybrid-vsock"
        _, writer = await connect_hvsock(self.address.path, self.address.port, timeout)
        writer.close()

    async def create_sandbox(self, sandbox_id: str, *, hostname: str, storages: list[Any]) -> None:
        self.created = {"sandbox_id": sandbox_id, "hostname": hostname, "storages": storages}

    async def close(self) -> None:
        self.closed = True

    async def set_vcpu_priorities(self, mapping: dict[str, list[int]]) -> None:
        self.created["vcpu_priorities"] = mapping

    async def set_memory(self, **state: Any) -> dict[str, int]:
        self.created["memory"] = state
        return await self.guest_memory()

    async def guest_memory(self) -> dict[str, int]:
        return {"total_bytes": 400 << 20, "available_bytes": 300 << 20}


def write_config(tmp_path: Path, *, path: str = FAKE_CLH, shared_fs: str = "none", colo: str = "") -> Path:
    for name in ("vmlinux", "initramfs.cpio"):
        (tmp_path / name).write_bytes(b"fake")
    toml = tmp_path / "configuration.toml"
    toml.write_text(f"""
[runtime]
hypervisor = "clh"
internetworking_model = "none"

[hypervisor.clh]
path = "{path}"
kernel = "{tmp_path / 'vmlinux'}"
initrd = "{tmp_path / 'initramfs.cpio'}"
default_vcpus = 2
default_memory = 256
shared_fs = "{shared_fs}"
boot_timeout = 20.0

[agent.kata]
transport = "hybrid-vsock"
dial_timeout = 5.0
{colo}""")
    return toml


def make_sandbox(tmp_path: Path, config: Path) -> Sandbox:
    ctx = BackendContext(namespace="default", sandbox_id="sb-clh", state_dir=str(tmp_path / "sbs" / "sb-clh"),
                         config_path=str(config))
    return Sandbox(ctx, agent_factory=HvsockAgent)  # type: ignore[arg-type]


def opts(tmp_path: Path, annotations: dict[str, str] | None = None) -> CreateOpts:
    return CreateOpts(id="sb-clh", bundle=str(tmp_path), spec={"hostname": "pod-a", "annotations": annotations or {}},
                      stdio=Stdio(), sandbox_id="sb-clh")


def journal(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "resources.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


async def test_sandbox_boots_and_stops_cloud_hypervisor(tmp_path: Path, fake_vmm: FakeVmm):
    sb = make_sandbox(tmp_path, write_config(tmp_path))
    await sb.start(opts(tmp_path))
    try:
        assert sb.state is State.RUNNING and isinstance(sb.hv, CloudHypervisor)
        pid = sb.vmm_pid()
        assert pid and os.path.exists(f"/proc/{pid}")
        vm = [e for e in journal(sb.state_dir) if e["kind"] == "vm"]
        assert vm and vm[0]["record"] == {"driver": "clh", "state_dir": str(sb.vm_dir), "pid": pid}
        agent = HvsockAgent.instances[-1]
        assert agent.address == AgentAddress("hybrid-vsock", path=str(sb.vm_dir / "clh.sock"), port=1024)
        created = dict(agent.created)
        memory = created.pop("memory")  # the memory resource told the guest its size after boot
        assert created == {"sandbox_id": "sb-clh", "hostname": "pod-a", "storages": []}
        assert memory["usable"] == memory["target"] == sb.resource("memory").target > 0
        assert "booted" in sb.console_tail()
        calls = fake_vmm.calls()
        assert calls[calls.index("vm.create"):calls.index("vm.boot") + 2] == ["vm.create", "vm.info", "vm.boot",
                                                                              "vm.info"]
    finally:
        await sb.stop()
    assert sb.state is State.STOPPED and agent.closed
    assert fake_vmm.calls()[-3:] == ["vm.shutdown", "vm.delete", "vmm.shutdown"]
    assert not sb.vm_dir.exists() and not os.path.exists(f"/proc/{pid}")
    assert journal(sb.state_dir) == []


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (host cgroups)")
async def test_qos_places_the_vmm_s_vcpu_threads(tmp_path: Path, fake_vmm: FakeVmm):
    """The QoS resource gets the fake VMM's real vcpu<N> threads from the driver and moves each
    into its priority's host cgroup; stop removes the groups."""
    from shim.resources.qos import QosManager, detect_driver

    root = f"kata-colo-clhtest-{secrets.token_hex(3)}"
    config = write_config(tmp_path, colo=f'[colo]\ncgroup_root = "{root}"\n'
                                         '[colo.priorities.high]\ncpu_shares = 1024\n'
                                         '[colo.priorities.low]\ncpu_shares = 2\n')
    sb = make_sandbox(tmp_path, config)
    try:
        await sb.start(opts(tmp_path, {ANNOTATION_VCPU_PRIORITIES: "high:1,low:1"}))
        assert sb.hv is not None
        threads = await sb.hv.vcpu_threads()
        assert sorted(threads) == [0, 1]
        for vcpu, prio in ((0, "high"), (1, "low")):
            assert any(p.endswith(f"/{root}/sb-clh/vcpu-{prio}") for p in vcpu_cgroup_dirs(threads[vcpu])), \
                (vcpu, vcpu_cgroup_dirs(threads[vcpu]))
        assert HvsockAgent.instances[-1].created["vcpu_priorities"] == {"high": [0], "low": [1]}
    finally:
        await sb.stop()
        QosManager.cleanup_sandbox("sb-clh", root)
    assert not detect_driver().exists(root)


async def test_sandbox_journal_recovers_cloud_hypervisor_after_a_shim_crash(tmp_path: Path, fake_vmm: FakeVmm):
    sb = make_sandbox(tmp_path, write_config(tmp_path))
    await sb.start(opts(tmp_path))
    pid = sb.vmm_pid()
    assert pid is not None
    # the shim "dies": a fresh process recovers from the journal alone (delete after kill -9)
    await sandbox_mod.recover(sb.state_dir)
    assert not proc_alive(pid)
    assert not sb.vm_dir.exists()
    assert journal(sb.state_dir) == []
    await sb.stop()  # the old handle still winds down cleanly


async def test_missing_binary_fails_at_create_and_leaves_nothing(tmp_path: Path):
    sb = make_sandbox(tmp_path, write_config(tmp_path, path="/opt/nowhere/cloud-hypervisor"))
    with pytest.raises(InvalidArgument, match="Cloud Hypervisor binary /opt/nowhere/cloud-hypervisor does not exist"):
        await sb.start(opts(tmp_path))
    assert sb.state is State.STOPPED
    assert not sb.vm_dir.exists()
    assert journal(sb.state_dir) == []


async def test_9p_share_is_refused_with_a_clear_message(tmp_path: Path):
    sb = make_sandbox(tmp_path, write_config(tmp_path, shared_fs="virtio-9p"))
    with pytest.raises(InvalidArgument, match=r"hypervisor clh has no virtio-9p; set shared_fs = \"none\""):
        await sb.start(opts(tmp_path))
    assert not sb.vm_dir.exists() and journal(sb.state_dir) == []


def test_the_sandbox_code_names_no_driver():
    """No ``if hypervisor == ...`` and no driver import in the sandbox or its resources: the
    driver comes from the registry and is used through the protocols only."""
    root = Path(shim.__file__).parent
    offenders = []
    for path in [*(root / "sandbox").rglob("*.py"), *(root / "resources").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                modules = []
            for module in modules:
                if module.startswith(("hypervisor.qemu", "hypervisor.clh")):
                    offenders.append(f"{path.name}: imports {module}")
            if isinstance(node, ast.Compare):
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and const.value in ("qemu", "clh"):
                        offenders.append(f"{path.name}:{node.lineno}: compares with {const.value!r}")
    assert offenders == []
