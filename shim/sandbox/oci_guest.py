"""Turn the host OCI spec containerd wrote into the spec the guest agent runs.

What changes (as kata's runtime does): ``root.path`` points at the container's rootfs in the
guest share; host namespace paths are dropped (the guest has its own; the pod network is the
guest's network); host hooks and host device nodes are dropped; bind mounts of host files and
directories (CRI's /etc/hosts, /etc/resolv.conf, /etc/hostname, termination-log, volumes) are
shared into the guest and their sources rewritten; mounts the storage provider serves from a
disk in the guest (data disks, direct volumes, passed-through NVMe: ``volumes``) become binds of
the guest directory the agent mounts the disk on; ``linux.devices`` entries for disks the agent
resolves (``keep_devices``) stay (the agent puts the guest's device numbers in), VFIO and other
host device nodes go; ``cgroupsPath`` is set to a guest path.
Everything is validated: a malformed spec is an InvalidArgument before anything is created.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import InvalidArgument

# Mount types the guest provides itself; never shared from the host.
_GUEST_FS = {"proc", "sysfs", "devpts", "tmpfs", "mqueue", "cgroup", "cgroup2", "shm"}
_HOST_ONLY_PREFIXES = ("/dev/", "/proc/", "/sys/")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidArgument(f"invalid OCI spec: {message}")


def validate(spec: Any) -> dict[str, Any]:
    _require(isinstance(spec, dict), "top level must be an object")
    proc = spec.get("process")
    _require(isinstance(proc, dict), "process must be an object")
    args = proc.get("args")
    _require(isinstance(args, list) and bool(args) and all(isinstance(a, str) for a in args),
             "process.args must be a non-empty list of strings")
    _require(isinstance(proc.get("env", []), list), "process.env must be a list")
    _require(isinstance(spec.get("root", {}), dict), "root must be an object")
    _require(isinstance(spec.get("mounts", []), list), "mounts must be a list")
    for m in spec.get("mounts", []):
        _require(isinstance(m, dict) and isinstance(m.get("destination"), str), "mount without destination")
    _require(isinstance(spec.get("annotations", {}), dict), "annotations must be an object")
    _require(isinstance(spec.get("linux", {}), dict), "linux must be an object")
    return spec


ShareFile = Callable[[str, str, bool], str]
"""(host source path, share name, read-only) → guest path; binds the host path into the guest
share (read-only on the host side when the container's mount is)."""


def share_name(container_id: str, destination: str, source: str) -> str:
    """The share entry of one of a container's host mounts (:func:`owns_share_name` knows it)."""
    digest = hashlib.sha256(f"{container_id}:{destination}".encode()).hexdigest()[:12]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(source.rstrip("/"))) or "root"
    return f"{container_id}-{digest}-{base}"[:128]


def owns_share_name(container_id: str, name: str) -> bool:
    return re.match(rf"{re.escape(container_id)}-[0-9a-f]{{12}}-", name) is not None


def to_guest(spec: dict[str, Any], container_id: str, guest_rootfs: str, share: ShareFile, *,
             volumes: Mapping[str, tuple[str, bool]] | None = None,
             keep_devices: tuple[str, ...] = ()) -> dict[str, Any]:
    """``volumes``: mount destination → (guest directory, read-only) for mounts served from a
    disk in the guest (a destination the spec lacks is added)."""
    validate(spec)
    out = copy.deepcopy(spec)
    out.pop("hooks", None)
    out["root"] = {"path": guest_rootfs, "readonly": bool(spec.get("root", {}).get("readonly", False))}
    mounts = []
    pending = dict(volumes or {})
    for m in out.get("mounts", []):
        if m["destination"] in pending:
            src, ro = pending.pop(m["destination"])
            mounts.append(_volume_bind(m["destination"], src, ro))
            continue
        mtype = m.get("type", "bind" if "bind" in (m.get("options") or []) else "")
        src = m.get("source", "")
        if mtype in _GUEST_FS or not src.startswith("/") or src.startswith(_HOST_ONLY_PREFIXES):
            if mtype == "bind" and src.startswith(_HOST_ONLY_PREFIXES):
                continue  # host device/proc/sys binds make no sense inside the VM
            mounts.append(m)
            continue
        if not os.path.exists(src):
            raise InvalidArgument(f"invalid OCI spec: mount source {src} does not exist")
        name = share_name(container_id, m["destination"], src)
        readonly = "ro" in (m.get("options") or [])
        m = dict(m, source=share(src, name, readonly))
        mounts.append(m)
    mounts += [_volume_bind(dest, src, ro) for dest, (src, ro) in pending.items()]
    out["mounts"] = mounts
    linux = out.setdefault("linux", {})
    namespaces = []
    for ns in linux.get("namespaces", []) or []:
        _require(isinstance(ns, dict) and isinstance(ns.get("type"), str), "bad namespace entry")
        if ns["type"] == "network":
            continue  # the guest's network is the pod's network
        namespaces.append({"type": ns["type"]})
    linux["namespaces"] = namespaces
    kept = [d for d in linux.pop("devices", None) or []
            if isinstance(d, dict) and os.path.normpath(str(d.get("path", ""))) in keep_devices]
    if kept:
        linux["devices"] = kept
    linux["cgroupsPath"] = f"/kata-colo/{container_id}"
    return out


def _volume_bind(destination: str, source: str, readonly: bool) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": source,
            "options": ["rbind", "ro" if readonly else "rw"]}


def process_from_exec(spec: Any) -> dict[str, Any]:
    """Validate an exec's OCI Process JSON (ExecProcessRequest.spec)."""
    _require(isinstance(spec, dict), "exec process must be an object")
    args = spec.get("args")
    _require(isinstance(args, list) and bool(args) and all(isinstance(a, str) for a in args),
             "exec process.args must be a non-empty list of strings")
    return spec
