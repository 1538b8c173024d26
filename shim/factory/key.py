"""What makes two VMs clones of one template: the VM's *shape* and its key.

A clone runs the template's saved memory and device state, so everything that shapes the VM
must be equal: the kernel, initrd and rootfs image (by real path, size and mtime — a rebuilt
image is another file), the QEMU binary (same), kernel parameters (the guest agent reads its
options there, e.g. its OCI runtime), vCPUs, memory, machine and driver options, the agent
channel and the 9p share tags (their host paths are each VM's own, on its own command line).
Per-VM things are not in the shape: ids, state directories, share host paths, the pod's NICs,
disks and VFIO devices (hot-plugged after restore). What cannot be hot-plugged (virtio-scsi
LUNs, the vsock agent channel's CID) keeps a VM from being a clone: :func:`clone_blockers`.

:func:`shape` is pure apart from ``stat``; :func:`key` hashes a shape (sorted JSON, sha256).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from common.version import VERSION
from hypervisor.base import VmConfig

FORMAT = 1


def file_identity(path: str) -> dict[str, Any] | None:
    """Real path, size and mtime of ``path`` (None for "" ; a missing file has size -1)."""
    if not path:
        return None
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return {"path": real, "size": -1, "mtime_ns": 0}
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def shape(cfg: VmConfig, driver: str) -> dict[str, Any]:
    """The template-relevant part of ``cfg`` (what a clone's command line must share)."""
    options = cfg.options
    opts = dataclasses.asdict(options) if dataclasses.is_dataclass(options) and not isinstance(options, type) else {}
    return {
        "format": FORMAT,
        "kata_colo": VERSION,
        "driver": driver,
        "hypervisor": file_identity(cfg.hypervisor_path),
        "kernel": file_identity(cfg.kernel),
        "initrd": file_identity(cfg.initrd),
        "image": file_identity(cfg.image),
        "kernel_params": cfg.kernel_params,
        "vcpus": cfg.vcpus,
        "max_vcpus": cfg.max_vcpus,
        "memory_mib": cfg.memory_mib,
        "max_memory_mib": cfg.max_memory_mib,
        "agent_channel": cfg.agent_channel,
        "vsock_port": cfg.vsock_port,
        "shares": sorted([d.tag, d.readonly] for d in cfg.shared_dirs),
        "debug": cfg.debug,
        "options": opts,
    }


def key(s: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:32]


def differences(template: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable fields in which two shapes differ (``memory_mib 512 → 1024``)."""
    out = []
    for name in sorted(set(template) | set(wanted)):
        a, b = template.get(name), wanted.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{name} ({', '.join(sub)})")
        else:
            out.append(f"{name} {a!r} → {b!r}")
    return out


def clone_blockers(cfg: VmConfig) -> list[str]:
    """What of ``cfg`` a clone cannot get (it must be on the boot command line)."""
    out = []
    scsi = [d.id for d in cfg.disks if d.driver == "virtio-scsi"]
    if scsi:
        out.append(f"virtio-scsi disk(s) {', '.join(scsi)} (cold-plug only)")
    if cfg.agent_channel != "virtio-serial":
        out.append(f"agent channel {cfg.agent_channel} (a clone would share the template's vsock CID)")
    return out
