"""kata's protobuf ``grpc.Spec`` → OCI runtime-spec JSON (config.json) for runc in the guest.

The protobuf ↔ JSON walk is :mod:`agent_api.oci_codec` (shared with the host). Guest adaptation
(:func:`adapt_for_guest`): hooks,
AppArmor/SELinux labels and host namespace paths are dropped, the root path is validated to
stay under the shared dir, the cgroup path is put under the agent's cgroup parent and the
agent's run directory (``/run/kata-colo``: resources.json) is bound read-only into the container.
"""
from __future__ import annotations

import os
from typing import Any

from agent_api.agent.validate import check_args, path_within
from agent_api.oci_codec import to_json
from common.errors import InvalidArgument
from common.guest_storage import GUEST_VOLUME_DIR
from proto.kata import oci_pb2

#: the agent's run directory, shown read-only in every container (agent_api.agent.resources_file)
RESOURCES_DIR = "/run/kata-colo"
# guest namespaces a container may not keep a host path for: it shares the guest's instead
_SHARE_WITH_GUEST = {"network", "ipc", "uts", "pid", "cgroup", "mount", "user"}
# ...except these, which get a new namespace instead (pid: the agent and every pod process
# would be visible and killable; mount: the container's mounts would land in the guest's)
_NEVER_GUEST = {"pid", "mount"}


def process_to_json(proc: oci_pb2.Process) -> dict[str, Any]:
    data = to_json(proc)
    data["args"] = check_args(list(proc.Args))
    data.setdefault("cwd", "/")
    if not data["cwd"].startswith("/"):
        raise InvalidArgument(f"process cwd {proc.Cwd!r} is not absolute")
    data.setdefault("user", {"uid": 0, "gid": 0})
    data.pop("apparmorProfile", None)
    data.pop("selinuxLabel", None)
    return data


def _is_bind(mount: dict[str, Any]) -> bool:
    return mount.get("type") == "bind" or any(o in ("bind", "rbind") for o in mount.get("options", []))


def adapt_for_guest(spec: oci_pb2.Spec, *, container_id: str, shared_dir: str,
                    cgroup_parent: str, block_rootfs: str = "") -> dict[str, Any]:
    """Build config.json for container ``container_id`` from kata's protobuf spec.
    ``block_rootfs``: the container's own rootfs the agent mounted from its storages (then the
    root path must be exactly that); bind sources may also be sandbox volumes (data disks)."""
    if not spec.HasField("Process"):
        raise InvalidArgument("OCI spec has no process")
    cfg = to_json(spec)
    cfg.setdefault("ociVersion", "1.0.2")
    cfg["process"] = process_to_json(spec.Process)

    default_root = os.path.join(shared_dir, container_id, "rootfs")
    root_path = spec.Root.Path if spec.HasField("Root") else ""
    if not root_path or not os.path.isabs(root_path):
        root_path = block_rootfs or default_root
    if block_rootfs:
        if os.path.normpath(root_path) != block_rootfs:
            raise InvalidArgument(f"root path {root_path!r} is not the container's rootfs {block_rootfs}")
        root_path = block_rootfs
    else:
        root_path = path_within(root_path, shared_dir)
    cfg["root"] = {"path": root_path, "readonly": bool(spec.Root.Readonly)}

    mounts = cfg.get("mounts", [])
    for m in mounts:
        if not m.get("destination", "").startswith("/"):
            raise InvalidArgument(f"mount destination {m.get('destination')!r} is not absolute")
        if _is_bind(m):
            m["source"] = _bind_source(m.get("source", ""), shared_dir)
    cfg["mounts"] = mounts

    linux = cfg.setdefault("linux", {})
    namespaces = []
    for ns in linux.get("namespaces", []):
        if ns.get("path"):
            if ns.get("type") not in _SHARE_WITH_GUEST:
                raise InvalidArgument(f"unknown namespace type {ns.get('type')!r}")
            if ns["type"] in _NEVER_GUEST:
                # the guest's pid/mount namespace holds the agent: never let a container in
                namespaces.append({"type": ns["type"]})
            continue  # a host path means "share the sandbox's": in the VM that is the guest's
        if ns.get("type") == "network":
            continue  # containers use the VM's network
        namespaces.append(ns)
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = f"{cgroup_parent.rstrip('/')}/{container_id}"
    linux.pop("mountLabel", None)
    add_resources_mount(cfg)
    return cfg


def _bind_source(source: str, shared_dir: str) -> str:
    try:
        return path_within(source, shared_dir)
    except InvalidArgument:
        if path_within(source, GUEST_VOLUME_DIR) == GUEST_VOLUME_DIR:
            raise InvalidArgument(f"bind source {source!r} is the volume dir itself") from None
        return path_within(source, GUEST_VOLUME_DIR)


def add_resources_mount(cfg: dict[str, Any]) -> None:
    """Bind the agent's run directory (resources.json, vcpu-priorities.json) read-only at the
    same path, after the container's own mounts (its /run tmpfs), unless it mounts that path."""
    mounts = cfg.setdefault("mounts", [])
    if any(os.path.normpath(m.get("destination", "")) == RESOURCES_DIR for m in mounts):
        return
    mounts.append({"destination": RESOURCES_DIR, "type": "bind", "source": RESOURCES_DIR,
                   "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})


def resources_to_json(res: oci_pb2.LinuxResources) -> dict[str, Any]:
    """LinuxResources for ``runc update --resources -``."""
    return to_json(res)
