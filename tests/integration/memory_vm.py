"""Helpers of the memory elasticity VM tests and bench: a real Sandbox (QEMU under TCG, the built
guest image of ``$KATA_COLO_IMAGE_DIR``, :mod:`tests.support.image`) with memory keys, commands in the guest outside any
container (the debug console), the guest's /proc/meminfo and the host RSS of QEMU."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from shim.backend import BackendContext, CreateOpts, Stdio
from shim.sandbox.sandbox import Sandbox
from tests.support import image

MIB = 1 << 20


def write_config(directory: Path, *, memory: int, maxmemory: int = 0, virtio_mem: bool = False,
                 reclaim: bool = True, balloon: bool = True, resize_timeout: float = 30.0,
                 reserve_mib: int = 64, vcpus: int = 2) -> Path:
    """A configuration booting the built guest image."""
    kernel, initrd = image.kernel_and_initrd()
    path = directory / "configuration.toml"
    path.write_text(f"""[hypervisor.qemu]
kernel = "{kernel}"
initrd = "{initrd}"
default_vcpus = {vcpus}
default_memory = {memory}
default_maxmemory = {maxmemory}
enable_virtio_mem = {str(virtio_mem).lower()}
enable_balloon = {str(balloon).lower()}
reclaim_guest_freed_memory = {str(reclaim).lower()}
[agent.kata]
debug_console_enabled = true
[colo.memory]
resize_timeout = {resize_timeout}
reserve_mib = {reserve_mib}
""")
    return path


@contextlib.asynccontextmanager
async def running_sandbox(conf: Path, prefix: str = "kcmem") -> AsyncIterator[Sandbox]:
    """A booted Sandbox; stopped (VM, share, journal) whatever happens."""
    sid = f"{prefix}-{secrets.token_hex(3)}"
    state = Path("/run/kata-colo/sbs") / sid
    sandbox = Sandbox(BackendContext(namespace="default", sandbox_id=sid, state_dir=str(state)))
    spec = {"process": {"args": ["true"]}, "hostname": prefix}
    try:
        await sandbox.start(CreateOpts(id=sid, bundle="", spec=spec, stdio=Stdio(), config_path=str(conf)))
        yield sandbox
    except BaseException:
        print("---- guest console (tail) ----\n" + sandbox.console_tail(6000))
        raise
    finally:
        await sandbox.stop()
        shutil.rmtree(state, ignore_errors=True)


async def guest_sh(sandbox: Sandbox, script: str, timeout: int = 120) -> tuple[int, str]:
    """Run ``sh -c script`` in the guest (outside containers): (exit code, stdout + stderr)."""
    resp = await sandbox.require_agent().client.debug_exec(["sh", "-c", script], timeout=timeout)
    return resp.exit_code, (resp.stdout + resp.stderr).decode(errors="replace")


async def guest_meminfo(sandbox: Sandbox) -> dict[str, int]:
    """The guest's /proc/meminfo in bytes."""
    rc, out = await guest_sh(sandbox, "cat /proc/meminfo")
    assert rc == 0, out
    values = {}
    for line in out.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    return values


def qemu_rss(pid: int) -> int:
    """VmRSS of the QEMU process in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def qemu_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
