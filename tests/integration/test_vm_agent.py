"""Issue-3 acceptance: the built guest image booted by the QEMU driver (TCG), the agent reached
over virtio-serial with AgentClient, containers from a local busybox rootfs on the 9p share:
stdout, exec, signals, exit codes (incl. non-zero), a tty with resize, vCPU thread ids; then
destroy, and no qemu process, socket or temp dir remains."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_api.client.convert import ninep_storage
from agent_api.client.facade import GuestAgent
from agent_api.client.rpc import AgentClient
from common.guest_paths import GUEST_SHARED_DIR
from hypervisor.base import NetDevice, SharedDir
from hypervisor.qemu.driver import QemuHypervisor
from shim import config
from shim.sandbox.vmconfig import vm_config
from tests.integration.test_agent_host import build_rootfs, exec_process, make_spec, read_all

IMAGE = Path("/var/lib/kata-colo/images/current")
pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(not (IMAGE / "manifest.json").exists(), reason="guest image not built")]


@dataclasses.dataclass
class BootedVm:
    state: Path
    shared: Path
    hv: QemuHypervisor
    guest: GuestAgent
    qemu_pid: int


@contextlib.asynccontextmanager
async def booted_vm(vcpus: int, hostname: str, nics: tuple[NetDevice, ...] = ()) -> AsyncIterator[BootedVm]:
    """Boot the built image (TCG) with ``vcpus`` vCPUs (and ``nics``), connect the agent over
    virtio-serial and create the guest sandbox with the 9p share; on exit stop the VM and remove
    every file."""
    state = Path(tempfile.mkdtemp(prefix="kc-vm-", dir="/run"))
    shared = state / "shared"
    shared.mkdir()
    cfg = vm_config(config.load(), state.name, state / "vm", shared_dirs=(SharedDir("kataShared", str(shared)),))
    hv = QemuHypervisor()
    guest: GuestAgent | None = None
    try:
        await hv.prepare(dataclasses.replace(cfg, vcpus=vcpus, max_vcpus=vcpus, nics=nics))
        await hv.start(timeout=60)
        pid = hv.vmm_pid()
        assert pid is not None
        guest = GuestAgent(hv.agent_address())
        await guest.connect(timeout=120, vm_gone=asyncio.Event())
        await guest.create_sandbox(state.name, hostname=hostname, storages=[ninep_storage("kataShared")])
        yield BootedVm(state, shared, hv, guest, pid)
    except BaseException:
        # the guest's side of a failure (agent log, kernel messages) is only in its console
        path = hv.console_log_path
        if path and os.path.exists(path):
            tail = Path(path).read_text(errors="replace").splitlines()[-60:]
            print("---- guest console (last 60 lines) ----", *tail, sep="\n")
        raise
    finally:
        if guest is not None:
            await guest.close()
        await hv.stop(timeout=10)
        await hv.cleanup()
        shutil.rmtree(state, ignore_errors=True)


def container(shared: Path, cid: str, args: list[str], **kw: object):
    build_rootfs(shared / cid / "rootfs")
    spec = make_spec(args, **kw)  # type: ignore[arg-type]
    spec.Root.Path = f"{GUEST_SHARED_DIR}/{cid}/rootfs"
    return spec


async def test_vm_agent_containers_exec_signals_tty_and_teardown():
    async with booted_vm(2, "kcvm") as vm:
        state, shared, hv, qemu_pid = vm.state, vm.shared, vm.hv, vm.qemu_pid
        client: AgentClient = vm.guest.client

        # vCPU threads: one per vCPU, each a thread of the qemu process
        threads = await hv.vcpu_threads()
        assert sorted(threads) == [0, 1]
        assert len(set(threads.values())) == 2
        for tid in threads.values():
            assert os.path.isdir(f"/proc/{qemu_pid}/task/{tid}")

        # uname -r in a container reads the guest kernel
        await client.create_container("c1", container(shared, "c1", ["uname", "-r"]))
        await client.start_container("c1")
        kernel = (await read_all(client, "c1")).decode().strip()
        assert kernel == json.loads((IMAGE / "manifest.json").read_text())["kernel"]
        assert await client.wait_process("c1") == 0
        await client.remove_container("c1")

        # a long-running container: exec with non-zero exit, exec killed by a signal, tty + resize
        await client.create_container("c2", container(shared, "c2", ["sleep", "600"]))
        await client.start_container("c2")
        await client.exec_process("c2", "e1", exec_process(["sh", "-c", "echo out; exit 3"]))
        assert (await read_all(client, "c2", "e1")).strip() == b"out"
        assert await client.wait_process("c2", "e1") == 3
        await client.exec_process("c2", "e2", exec_process(["sleep", "300"]))
        await client.signal_process("c2", "e2", signal.SIGKILL)
        assert await client.wait_process("c2", "e2") == 128 + signal.SIGKILL
        await client.exec_process("c2", "t1", exec_process(["sh", "-c", "read l; tty; stty size"], terminal=True))
        await client.tty_win_resize("c2", "t1", 40, 100)
        await client.write_stdin("c2", "t1", b"go\n")
        out = await read_all(client, "c2", "t1")
        assert b"/dev/pts/" in out and b"40 100" in out, out
        assert await client.wait_process("c2", "t1") == 0
        await client.signal_process("c2", "", signal.SIGKILL)
        assert await client.wait_process("c2") == 128 + signal.SIGKILL
        await client.remove_container("c2")
        await client.destroy_sandbox()
    assert not os.path.exists(f"/proc/{qemu_pid}")
    assert not state.exists()
