"""A container's own storages (CreateContainerRequest.storages/devices): mounted before runc
creates it, unmounted after it is removed.

Storage drivers (kata's names): ``blk``/``virtio-blk``, ``scsi``, ``nvme`` — a disk found by
:mod:`agent_api.agent.devices` and mounted with its ``fstype`` — and ``overlayfs``: the container's
block rootfs, assembled from its own layer mounts and scratch disk. Everything is validated
before anything is mounted (the host is not trusted either): a disk mounts only below the
container's block dir (:func:`common.guest_storage.container_block_dir`) or the sandbox volume
dir, the overlay's ``lowerdir``/``upperdir``/``workdir`` only name paths of the same container,
filesystems come from a fixed list, options are fstab flags or plain ``key[=value]`` data
options (no ``loop``, no ``bind``). Devices (``blk``/``nvme`` disks given as device nodes;
``vfio-net``/``vfio-pci`` passed-through functions) are resolved to guest devices: a disk's
``linux.devices`` entry gets the guest's major:minor and a matching cgroup rule; a NIC is
brought up with its IRQs on the high-priority vCPUs.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent_api.agent import devices as devmod
from agent_api.agent.validate import path_within
from common import guest_storage as gs
from common.errors import InvalidArgument, ResourceError
from common.mount import MS_BIND, mount, parse_options, umount
from proto.kata import agent_pb2

log = logging.getLogger(__name__)

DISK_FSTYPES = ("erofs", "ext4", "ext3", "ext2", "xfs", "btrfs", "vfat")
MAX_STORAGES = 80
_DATA_OPT = re.compile(r"[a-z_]{1,32}(=[A-Za-z0-9_.:-]{1,64})?")
_FORBIDDEN_DATA = {"loop", "bind", "rbind", "x-mount.mkdir"}
_OVERLAY_KEYS = ("lowerdir", "upperdir", "workdir")


@dataclass(frozen=True)
class PlannedMount:
    driver: str
    source: str
    fstype: str
    flags: int
    data: str
    target: str
    overlay_dirs: tuple[str, ...] = ()


def _check_data(data: str, where: str) -> None:
    for opt in filter(None, data.split(",")):
        if not _DATA_OPT.fullmatch(opt) or opt.split("=")[0] in _FORBIDDEN_DATA:
            raise InvalidArgument(f"{where}: mount option {opt!r} is not allowed")


def plan(container_id: str, storages: Sequence[agent_pb2.Storage]) -> list[PlannedMount]:
    """Validate ``storages`` of ``container_id`` (InvalidArgument on the first bad one)."""
    if len(storages) > MAX_STORAGES:
        raise InvalidArgument(f"{len(storages)} storages (at most {MAX_STORAGES})")
    own = gs.container_block_dir(container_id)
    out: list[PlannedMount] = []
    targets: set[str] = set()
    for st in storages:
        where = f"storage {st.mount_point!r}"
        if st.driver in gs.BLOCK_DRIVERS:
            if st.fstype not in DISK_FSTYPES:
                raise InvalidArgument(f"{where}: filesystem {st.fstype!r} is not one of {DISK_FSTYPES}")
            try:
                target = path_within(st.mount_point, own)
            except InvalidArgument:
                target = path_within(st.mount_point, gs.GUEST_VOLUME_DIR)
            if target in (own, gs.GUEST_VOLUME_DIR):
                raise InvalidArgument(f"{where}: not a mount point of its own")
            if not (st.source.startswith(gs.SERIAL_PREFIX) or gs.PCI_PATH_RE.fullmatch(st.source)
                    or gs.SCSI_ADDR_RE.fullmatch(st.source)):
                raise InvalidArgument(f"{where}: bad disk source {st.source!r}")
            flags, data = parse_options(st.options)
            _check_data(data, where)
            out.append(PlannedMount(st.driver, st.source, st.fstype, flags, data, target))
        elif st.driver == gs.OVERLAY_DRIVER:
            if st.fstype not in ("", "overlay"):
                raise InvalidArgument(f"{where}: overlayfs storage with fstype {st.fstype!r}")
            target = path_within(st.mount_point, own)
            if target != gs.block_rootfs(container_id):
                raise InvalidArgument(f"{where}: the overlay must be mounted at {gs.block_rootfs(container_id)}")
            flags, data = parse_options(st.options)
            kv = dict(o.split("=", 1) for o in data.split(",") if "=" in o)
            if set(kv) != set(_OVERLAY_KEYS) or len(data.split(",")) != len(_OVERLAY_KEYS):
                raise InvalidArgument(f"{where}: overlay needs exactly lowerdir=, upperdir=, workdir=")
            dirs = [path_within(p, own) for p in kv["lowerdir"].split(":") if p]
            if not dirs:
                raise InvalidArgument(f"{where}: empty lowerdir")
            upper, work = path_within(kv["upperdir"], own), path_within(kv["workdir"], own)
            data = f"lowerdir={':'.join(dirs)},upperdir={upper},workdir={work}"
            out.append(PlannedMount(st.driver, "overlay", "overlay", flags, data, target,
                                    overlay_dirs=(upper, work, *dirs)))
        else:
            raise InvalidArgument(f"{where}: unsupported container storage driver {st.driver!r}")
        if target in targets:
            raise InvalidArgument(f"{where}: mounted twice")
        targets.add(target)
    return out


@dataclass
class ContainerMounts:
    """What :func:`mount_all` mounted for one container (undone by :meth:`unmount`)."""

    container_id: str
    mounted: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    root_path: str = ""

    def unmount(self) -> None:
        errors = []
        for target in reversed(self.mounted):
            try:
                umount(target)
            except ResourceError as exc:
                errors.append(str(exc))
        self.mounted = []
        if errors:
            raise ResourceError(f"container {self.container_id}: unmount failed: " + "; ".join(errors))
        shutil.rmtree(gs.container_block_dir(self.container_id), ignore_errors=True)
        for target in self.volumes:
            try:
                os.rmdir(target)
            except OSError:
                pass
        self.volumes = []


async def mount_all(container_id: str, storages: Sequence[agent_pb2.Storage], *,
                    timeout: float = devmod.DEFAULT_TIMEOUT, roots: devmod.SysRoots = devmod.ROOTS) -> ContainerMounts:
    """Mount every storage in order (a failure unmounts the ones already mounted)."""
    planned = plan(container_id, storages)
    result = ContainerMounts(container_id)
    try:
        for p in planned:
            if p.driver == gs.OVERLAY_DRIVER:
                for d in p.overlay_dirs:
                    if not os.path.isdir(d):  # upper/work (and an empty lower) live on the scratch disk
                        os.makedirs(d, mode=0o755, exist_ok=True)
                os.makedirs(p.target, exist_ok=True)
                mount("overlay", p.target, "overlay", p.flags, p.data)
                result.root_path = p.target
            else:
                node = await devmod.wait_block(p.source, timeout, roots)
                os.makedirs(p.target, exist_ok=True)
                if p.target.startswith(gs.GUEST_VOLUME_DIR + "/"):
                    result.volumes.append(p.target)
                mount(node, p.target, p.fstype, p.flags & ~MS_BIND, p.data)
                if p.target == gs.block_rootfs(container_id):
                    result.root_path = p.target
            result.mounted.append(p.target)
            log.info("container %s: mounted %s %s on %s", container_id, p.fstype, p.source, p.target)
    except BaseException:
        try:
            result.unmount()
        except ResourceError as exc:
            log.warning("%s", exc)
        raise
    return result


async def apply_devices(container_id: str, devices: Sequence[agent_pb2.Device], config: dict[str, Any], *,
                        timeout: float = devmod.DEFAULT_TIMEOUT, roots: devmod.SysRoots = devmod.ROOTS) -> None:
    """Resolve ``devices`` and edit the container's config.json (``linux.devices`` numbers and
    cgroup rules); passed-through NICs are brought up."""
    linux = config.setdefault("linux", {})
    spec_devices = linux.get("devices") or []
    rules = linux.setdefault("resources", {}).setdefault("devices", [])
    for d in devices:
        if d.type not in gs.DEVICE_TYPES:
            raise InvalidArgument(f"device {d.id!r}: unsupported type {d.type!r}")
        if d.type in ("blk", "nvme"):
            node = await devmod.wait_block(d.vm_path, timeout, roots)
            major, minor = devmod.device_numbers(node)
            entry = next((e for e in spec_devices if os.path.normpath(e.get("path", "")) == d.container_path), None)
            if entry is None:
                raise InvalidArgument(f"device {d.id}: no linux.devices entry for {d.container_path!r}")
            entry.update(type="b", major=major, minor=minor)
            rules.append({"allow": True, "type": "b", "major": major, "minor": minor, "access": "rwm"})
            log.info("container %s: %s is guest %s (%d:%d)", container_id, d.container_path, node, major, minor)
        elif d.type == "vfio-net":
            await devmod.setup_nic(d.vm_path, list(d.options), timeout, roots)
        else:
            await devmod.wait_pci(d.vm_path, timeout, roots)
