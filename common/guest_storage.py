"""Where the guest agent mounts a container's block storage, and how the host names the disks
(the names both sides agree on; kata's Storage/Device fields carry them).

* Block rootfs of container ``<cid>``: read-only layers at ``<GUEST_BLOCK_DIR>/<cid>/lower/<n>``
  (n = 0 is the top layer), the scratch disk at ``.../scratch`` (overlay ``upper``/``work``
  inside it), the assembled overlay at ``.../rootfs`` (the OCI ``root.path``).
* Data disks and passed-through NVMe namespaces at ``<GUEST_VOLUME_DIR>/<disk id>``; the
  container's mount becomes a bind of that directory.
* A Storage's or Device's ``source``/``vm_path`` names the disk by ``serial:<serial>`` (disks
  the host emulates, whose serial it sets), by kata's guest PCI path ``02/00`` (a hot-plugged or
  passed-through PCI device), or by SCSI address ``<target>:<lun>``.
* Storage drivers (kata's names): ``blk``/``virtio-blk``, ``scsi``, ``nvme``, and ``overlayfs``
  (the overlay itself, from paths of the same container only).
"""
from __future__ import annotations

import re

from common.guest_paths import SHARED_MOUNT_BASE

GUEST_BLOCK_DIR = f"{SHARED_MOUNT_BASE}/block"
GUEST_VOLUME_DIR = f"{SHARED_MOUNT_BASE}/sandbox/storage"
BLOCK_DRIVERS = ("blk", "virtio-blk", "scsi", "nvme")
OVERLAY_DRIVER = "overlayfs"
SERIAL_PREFIX = "serial:"
SERIAL_RE = re.compile(r"[A-Za-z0-9_.-]{1,20}")
PCI_PATH_RE = re.compile(r"[0-9a-f]{2}(/[0-9a-f]{2}){0,7}")
SCSI_ADDR_RE = re.compile(r"[0-9]{1,3}:[0-9]{1,5}")
#: kata's Device.type values this agent resolves.
DEVICE_TYPES = ("blk", "nvme", "vfio-net", "vfio-pci")


def container_block_dir(container_id: str) -> str:
    return f"{GUEST_BLOCK_DIR}/{container_id}"


def block_rootfs(container_id: str) -> str:
    return f"{container_block_dir(container_id)}/rootfs"


def lower_dir(container_id: str, index: int) -> str:
    return f"{container_block_dir(container_id)}/lower/{index}"


def scratch_dir(container_id: str) -> str:
    return f"{container_block_dir(container_id)}/scratch"


def volume_dir(disk_id: str) -> str:
    return f"{GUEST_VOLUME_DIR}/{disk_id}"


def storage_driver_for(block_driver: str) -> str:
    """The kata Storage driver of a host block controller (virtio-blk, virtio-scsi, nvme)."""
    return {"virtio-blk": "blk", "virtio-scsi": "scsi", "nvme": "nvme"}[block_driver]
