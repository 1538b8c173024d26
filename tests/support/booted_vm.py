"""A real VM for integration tests: the guest image (tests.support.image) booted by the QEMU
driver under TCG, the agent connected over virtio-serial, the guest sandbox created with the 9p
share; and busybox containers on that share."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from agent_api.client.convert import ninep_storage
from agent_api.client.facade import GuestAgent
from common.guest_paths import GUEST_SHARED_DIR
from hypervisor.base import NetDevice, SharedDir
from hypervisor.qemu.driver import QemuHypervisor
from proto.kata import oci_pb2
from shim import config
from shim.sandbox.vmconfig import vm_config
from tests.support import image
from tests.support.agent import build_rootfs, make_spec

IMAGE = image.current()


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
    overrides: dict[str, object] = {}
    if image.overridden():
        overrides["kernel"], overrides["initrd"] = image.kernel_and_initrd()
    cfg = vm_config(config.load(), state.name, state / "vm", shared_dirs=(SharedDir("kataShared", str(shared)),),
                    **overrides)
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


def container(shared: Path, cid: str, args: list[str], **kw: object) -> oci_pb2.Spec:
    """A busybox rootfs at ``shared/<cid>/rootfs`` and the spec running ``args`` in it."""
    build_rootfs(shared / cid / "rootfs")
    spec = make_spec(args, **kw)  # type: ignore[arg-type]
    spec.Root.Path = f"{GUEST_SHARED_DIR}/{cid}/rootfs"
    return spec
