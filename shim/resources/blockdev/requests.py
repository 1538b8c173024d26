"""What a container asks for beyond its rootfs: data disks and VFIO devices, read from its OCI
spec (pure parsing + ``stat``; nothing is made here).

* **Data disks** (:class:`DiskRequest`): an OCI ``linux.devices`` entry of type ``b`` (the host
  block device with that major:minor, given to the container as a device node), a mount whose
  source is a host block device (mounted at its destination with the mount's type), or a mount
  whose source is a kata **direct volume** (``<direct_volumes_dir>/<base64url(source)>/mountInfo.json``
  = ``{"volume_type", "device", "fstype", "metadata", "options"}``; ``device`` a block device or
  a disk image file).
* **VFIO** (:class:`VfioRequest`): an OCI ``linux.devices`` path under ``/dev/vfio/`` (except
  ``/dev/vfio/vfio``), and CDI devices named in ``cdi.k8s.io/*`` annotations whose CDI spec
  (``/etc/cdi``, ``/var/run/cdi``; JSON or YAML) adds such a device node. The annotation
  ``io.katacontainers.colo.nvme-mounts`` (``/data:ext4,/logs``) mounts the passed-through NVMe
  namespaces, in PCI address order, at those paths (kata's ``vfio_mode=guest-kernel``: the guest
  driver owns the device).
"""
from __future__ import annotations

import base64
import glob
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument, NotFound

DIRECT_VOLUMES_DIR = "/run/kata-containers/shared/direct-volumes"
MOUNT_INFO = "mountInfo.json"
CDI_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"
ANNOTATION_NVME_MOUNTS = "io.katacontainers.colo.nvme-mounts"
DISK_FSTYPES = ("ext4", "xfs", "ext3", "ext2", "btrfs", "vfat")
_CDI_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*=[A-Za-z0-9_.:-]+")
MAX_INFO_BYTES = 64 << 10


@dataclass(frozen=True)
class DiskRequest:
    """``source``: the host block device or image file. ``mode``: ``mount`` (mounted at
    ``destination`` with ``fstype``/``options``) or ``device`` (a device node at
    ``destination``; ``oci_device`` is the spec entry)."""

    source: str
    mode: str
    destination: str
    fstype: str = ""
    options: tuple[str, ...] = ()
    readonly: bool = False
    oci_device: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class VfioRequest:
    """One ``/dev/vfio`` node the container names (``container_path``)."""

    host_path: str
    container_path: str
    oci_device: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class NvmeMount:
    destination: str
    fstype: str = "ext4"
    options: tuple[str, ...] = ()


@dataclass
class ContainerRequests:
    disks: list[DiskRequest] = field(default_factory=list)
    vfio: list[VfioRequest] = field(default_factory=list)
    nvme_mounts: list[NvmeMount] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.disks or self.vfio)


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def host_block_device(major: int, minor: int, hint: str = "") -> str:
    """The host device node of block device ``major:minor`` (``hint`` first, then sysfs)."""
    if hint and _is_block(hint) and os.stat(hint).st_rdev == os.makedev(major, minor):
        return hint
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    node = "/dev/" + line.strip().split("=", 1)[1]
                    if _is_block(node):
                        return node
    except OSError:
        pass
    raise NotFound(f"no host block device {major}:{minor}")


def direct_volume_info(source: str, root: str = DIRECT_VOLUMES_DIR) -> dict[str, Any] | None:
    """kata's mountInfo.json for volume path ``source``, or None when it is not a direct volume."""
    name = base64.urlsafe_b64encode(source.encode()).decode()
    path = os.path.join(root, name, MOUNT_INFO)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INFO_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(raw) > MAX_INFO_BYTES:
        raise InvalidArgument(f"{path}: larger than {MAX_INFO_BYTES} bytes")
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{path}: not JSON: {exc}") from None
    if not isinstance(info, dict) or not isinstance(info.get("device"), str):
        raise InvalidArgument(f"{path}: needs a \"device\" string")
    return info


def _check_fstype(fstype: str, where: str) -> str:
    if fstype not in DISK_FSTYPES:
        raise InvalidArgument(f"{where}: filesystem {fstype!r} is not one of {DISK_FSTYPES}")
    return fstype


def _mount_options(options: Sequence[Any]) -> tuple[tuple[str, ...], bool]:
    opts = [str(o) for o in options if o not in ("bind", "rbind", "rprivate", "private", "")]
    return tuple(opts), "ro" in opts


def parse_nvme_mounts(value: str) -> list[NvmeMount]:
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        dest, _, fstype = item.partition(":")
        if not dest.startswith("/") or "\x00" in dest or ".." in dest.split("/"):
            raise InvalidArgument(f"{ANNOTATION_NVME_MOUNTS}: bad destination {dest!r}")
        out.append(NvmeMount(dest, _check_fstype(fstype or "ext4", ANNOTATION_NVME_MOUNTS)))
    return out


def cdi_device_nodes(name: str, spec_dirs: Sequence[str] = CDI_SPEC_DIRS) -> list[str]:
    """Host device node paths CDI device ``vendor/class=dev`` adds (NotFound when no spec has it)."""
    if not _CDI_NAME.fullmatch(name):
        raise InvalidArgument(f"bad CDI device name {name!r}")
    kind, _, dev = name.partition("=")
    for d in spec_dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.json")) + glob.glob(os.path.join(d, "*.yaml"))):
            spec = _load_cdi(path)
            if spec.get("kind") != kind:
                continue
            for device in spec.get("devices") or []:
                if isinstance(device, dict) and device.get("name") == dev:
                    edits = device.get("containerEdits") or {}
                    nodes = [n.get("hostPath") or n.get("path") for n in edits.get("deviceNodes") or []
                             if isinstance(n, dict)]
                    return [str(n) for n in nodes if n]
    raise NotFound(f"CDI device {name} is in no CDI spec under {', '.join(spec_dirs)}")


def _load_cdi(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INFO_BYTES + 1)
    except OSError:
        return {}
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            import yaml  # PyYAML: CDI specs are usually YAML

            data = yaml.safe_load(raw)
    except Exception as exc:  # noqa: BLE001 - a broken spec file is skipped, not fatal
        raise InvalidArgument(f"CDI spec {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def parse(spec: Mapping[str, Any], *, direct_volumes_dir: str = DIRECT_VOLUMES_DIR,
          cdi_spec_dirs: Sequence[str] = CDI_SPEC_DIRS) -> ContainerRequests:
    """The data disks and VFIO devices ``spec`` asks for (InvalidArgument/NotFound when it
    names one that does not exist or is not what it claims to be)."""
    req = ContainerRequests()
    linux = spec.get("linux") or {}
    for dev in linux.get("devices") or []:
        if not isinstance(dev, dict) or not isinstance(dev.get("path"), str):
            raise InvalidArgument("invalid OCI spec: linux.devices entry without a path")
        path = os.path.normpath(dev["path"])
        if path.startswith("/dev/vfio/"):
            if path != "/dev/vfio/vfio":
                req.vfio.append(VfioRequest(path, path, dev))
            continue
        if dev.get("type") == "b":
            try:
                major, minor = int(dev["major"]), int(dev["minor"])
            except (KeyError, TypeError, ValueError):
                raise InvalidArgument(f"invalid OCI spec: block device {path} without major/minor") from None
            req.disks.append(DiskRequest(host_block_device(major, minor, path), "device", path,
                                         oci_device=dev))
    annotations = spec.get("annotations") or {}
    for key, value in sorted(annotations.items()):
        if key.startswith(CDI_ANNOTATION_PREFIX):
            for name in filter(None, (v.strip() for v in str(value).split(","))):
                for node in cdi_device_nodes(name, cdi_spec_dirs):
                    if node.startswith("/dev/vfio/") and all(v.host_path != node for v in req.vfio):
                        req.vfio.append(VfioRequest(node, node))
    if annotations.get(ANNOTATION_NVME_MOUNTS):
        req.nvme_mounts = parse_nvme_mounts(str(annotations[ANNOTATION_NVME_MOUNTS]))
    for m in spec.get("mounts") or []:
        src, dest = str(m.get("source") or ""), str(m.get("destination") or "")
        if not src.startswith("/"):
            continue
        options, ro = _mount_options(m.get("options") or [])
        info = direct_volume_info(src, direct_volumes_dir)
        if info is not None:
            device = info["device"]
            if not os.path.isabs(device) or not (os.path.isfile(device) or _is_block(device)):
                raise NotFound(f"direct volume {src}: device {device!r} is not a block device or image file")
            fstype = _check_fstype(str(info.get("fstype") or "ext4"), f"direct volume {src}")
            extra = tuple(str(o) for o in info.get("options") or [])
            req.disks.append(DiskRequest(device, "mount", dest, fstype, options + extra, ro or "ro" in extra))
        elif m.get("type") not in ("bind", None, "") and _is_block(src):
            fstype = _check_fstype(str(m.get("type")), f"mount {dest}")
            req.disks.append(DiskRequest(src, "mount", dest, fstype, options, ro))
    return req
