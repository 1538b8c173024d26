"""VM identity apart from sandbox identity (kata's VM + ``VM.assignSandbox``).

Every VM has its own id (32 hex characters) and directory ``/run/kata-colo/vm/<vm-id>/`` (QMP,
agent and console sockets/logs, pidfile; the pre-booted VM's share export below ``shared/``),
made by the hypervisor driver. A VM made before its sandbox existed (a cached clone) is given
to the sandbox by :func:`assign_sandbox`: ``sbs/<sandbox-id>/vm`` becomes a symlink to the VM's
directory. The sandbox's resource journal records the VM (driver record: state_dir + pid), so
``delete`` after a crash kills it and removes its directory whichever way it was made.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

VM_ROOT = Path(os.environ.get("KATA_COLO_VM_ROOT", "/run/kata-colo/vm"))
SANDBOX_LINK = "vm"


def new_vm_id() -> str:
    return secrets.token_hex(16)


def vm_dir(vm_id: str, root: Path | None = None) -> Path:
    return (root or VM_ROOT) / vm_id


def assign_sandbox(vm_state_dir: str | os.PathLike[str], sandbox_dir: Path) -> Path:
    """Link the VM's directory into the sandbox's (``<sandbox_dir>/vm``); replaces a stale
    link, never a real directory. Returns the link."""
    link = sandbox_dir / SANDBOX_LINK
    target = os.fspath(vm_state_dir)
    if link.is_symlink():
        if os.readlink(link) == target:
            return link
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a VM link")
    tmp = sandbox_dir / f".{SANDBOX_LINK}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
    return link
