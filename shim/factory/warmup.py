"""Getting the template VM ready to be saved, and warm.

A clone resumes exactly where the template was saved, so whatever the template did once every
clone has done: its first container skips the agent's and the guest kernel's first-time work
(imports, page cache of the OCI runtime and its libraries, code paths), measured here at
≈ 0.2 s of the first CreateContainer under TCG. :func:`prepare_template` therefore waits for the
agent, then — when the VM exports the sandbox share and the host has a static busybox — runs
one throw-away container in it (CreateSandbox with the share, create/start/wait/remove, then
DestroySandbox, which unmounts the share again: QEMU cannot save while a 9p export is mounted,
and every clone's own CreateSandbox must find no sandbox there). A warm-up that fails is
logged and the template is saved as it is, once the guest sandbox is destroyed (if that fails
too, so does the build). Nothing of the warm-up stays on the host: its rootfs is in the template
VM's own directory, removed with it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from agent_api.client.convert import ninep_storage
from agent_api.client.facade import GuestAgent
from common.errors import KataColoError
from common.guest_paths import GUEST_SHARED_DIR, SHARE_TAG
from hypervisor.base import Hypervisor, VmConfig

log = logging.getLogger(__name__)

WARMUP_ID = "kata-colo-warmup"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "echo", "true")
READ = 4096


def is_static_elf(path: str) -> bool:
    """An ELF without a program interpreter (runs in a rootfs holding nothing else)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in head and b"/lib/ld-linux" not in head


def build_rootfs(root: Path, busybox: str = BUSYBOX) -> None:
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)


def warmup_spec(guest_root: str) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", "echo warm"], "cwd": "/", "env": ["PATH=/bin"],
                    "user": {"uid": 0, "gid": 0}, "noNewPrivileges": True},
        "root": {"path": guest_root},
        "hostname": "warmup",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }


async def _run_one(agent: GuestAgent, guest_root: str) -> bytes:
    await agent.create_container(WARMUP_ID, warmup_spec(guest_root))
    await agent.start_container(WARMUP_ID)
    out = b""
    while chunk := await agent.read_stdout(WARMUP_ID, "", READ):
        out += chunk
    await agent.wait_process(WARMUP_ID, "")
    await agent.remove_container(WARMUP_ID)
    return out


async def prepare_template(hv: Hypervisor, cfg: VmConfig, timeout: float) -> None:
    """``Template.build``'s ready step: the agent answers (and, where possible, has run one
    container), the share is unmounted and the agent link closed."""
    agent = GuestAgent(hv.agent_address())
    try:
        await agent.connect(timeout=timeout, vm_gone=asyncio.Event())
        share = next((Path(d.host_path) for d in cfg.shared_dirs if d.tag == SHARE_TAG), None)
        if share is None or not is_static_elf(BUSYBOX):
            log.info("template: no warm-up container (%s)", "no 9p share" if share is None
                     else f"{BUSYBOX} is not a static binary")
            return
        await asyncio.to_thread(build_rootfs, share / WARMUP_ID / "rootfs")
        await agent.create_sandbox(WARMUP_ID, hostname="kata-colo", storages=[ninep_storage(SHARE_TAG)])
        try:
            out = await asyncio.wait_for(_run_one(agent, f"{GUEST_SHARED_DIR}/{WARMUP_ID}/rootfs"), timeout)
            if out.strip() != b"warm":
                log.warning("template: warm-up container printed %r", out[:64])
        except (KataColoError, TimeoutError) as exc:
            log.warning("template: warm-up container failed (saving the template unwarmed): %s", exc)
        finally:
            await agent.client.destroy_sandbox()  # unmounts the share: QEMU can save again
    finally:
        await agent.close()

