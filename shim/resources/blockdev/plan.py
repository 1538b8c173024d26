"""Plan one container's storage: which disks and VFIO functions its :class:`ContainerStorage`
resource makes, and what the guest is told (kata Storage/Device dicts, the OCI rewrites).

Pure apart from the layer cache (building/leasing layer images) and sysfs reads. The rootfs is
a block rootfs when the configuration allows it (``disable_block_device_use`` false), containerd
gave overlay layers or a devmapper block device, the image builder is installed and the disks
can reach the VM (cold-plugged for the sandbox's first container; hot-plugged later, which needs a
free root port for virtio-blk or the virtio-scsi controller). Otherwise the rootfs stays on the
9p share (``rootfs_mode`` = ``9p``, with the reason logged).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from common import guest_storage as gs
from common.errors import FailedPrecondition
from hypervisor.base import BlockDevice, VfioDevice
from shim.resources.blockdev import claims, layers, mkimage, requests, scratch
from shim.resources.blockdev.cache import LayerCache, LayerLease
from shim.resources.blockdev.resource import ContainerStorage, Disk, VfioFunction
from shim.resources.vfio import sysfs

log = logging.getLogger(__name__)

VFIO_NO_PORT = "cold_plug_vfio= or hot_plug_vfio= port is not set"  # kata's error


@dataclass
class Plan:
    """``resource`` None = nothing to attach (9p rootfs, no devices)."""

    rootfs_mode: str                      # block | snapshot | 9p
    reason: str = ""
    resource: ContainerStorage | None = None
    requests: requests.ContainerRequests = field(default_factory=requests.ContainerRequests)
    lowers: int = 0
    cache_hits: int = 0
    cache_seconds: float = 0.0
    snapshot_fstype: str = ""
    snapshot_options: tuple[str, ...] = ()


def _hash(container_id: str) -> str:
    return hashlib.sha256(container_id.encode()).hexdigest()[:10]


def rootfs_block_driver(cfg: Any) -> str:
    return str(getattr(cfg.hypervisor.options, "block_device_driver", "virtio-blk"))


def can_hotplug_block(cfg: Any, hotplug: tuple[str, ...]) -> bool:
    return rootfs_block_driver(cfg) == "virtio-scsi" or "block" in hotplug


def rootfs_source(cfg: Any, rootfs: Any, cold: bool, hotplug: tuple[str, ...]) -> layers.RootfsSource:
    if cfg.hypervisor.disable_block_device_use:
        return layers.Unsupported("disable_block_device_use = true")
    if not cold and not can_hotplug_block(cfg, hotplug):
        return layers.Unsupported("later containers' disks need hot-plug: set pcie_root_ports > 0 "
                                  "or block_device_driver = \"virtio-scsi\"")
    src = layers.classify(rootfs)
    if isinstance(src, layers.Layered) and mkimage.tool_for(cfg.storage.layer_image_format) is None:
        return layers.Unsupported(f"{mkimage.TOOLS[cfg.storage.layer_image_format]} is not installed")
    return src


async def make_plan(cfg: Any, sandbox_id: str, container_id: str, rootfs: Any, spec: dict[str, Any], *,
                    cold: bool, hotplug: tuple[str, ...], cache: LayerCache, block_reason: str = "") -> Plan:
    """The container's plan; leases taken here are released when planning fails.
    ``block_reason`` forces the 9p rootfs (why the block rootfs could not be used)."""
    st = cfg.storage
    reqs = requests.parse(spec, direct_volumes_dir=st.direct_volumes_dir, cdi_spec_dirs=st.cdi_spec_dirs)
    src = layers.Unsupported(block_reason) if block_reason else rootfs_source(cfg, rootfs, cold, hotplug)
    h = _hash(container_id)
    res = ContainerStorage(sandbox_id, container_id, scratch_bytes=st.scratch_disk_mib << 20,
                           image_format=st.layer_image_format, claims_dir=st.claims_dir,
                           bind_vfio=st.vfio_bind, cold=cold)
    plan = Plan("9p", src.reason if isinstance(src, layers.Unsupported) else "", None, reqs)
    driver = rootfs_block_driver(cfg)
    try:
        if isinstance(src, layers.Layered):
            plan.rootfs_mode = "block"
            if src.upper_has_content:
                path = scratch.scratch_path(st.scratch_dir, sandbox_id, container_id,
                                            f"upper.{st.layer_image_format}")
                res.disks.append(Disk(BlockDevice(f"ku{h}", path, True, driver, f"ku{h}"), "upper",
                                      build_from=src.upper))
            for i, lower in enumerate(src.lowers):
                lease: LayerLease = await asyncio.to_thread(cache.acquire, lower)
                res.leases.append(lease)
                plan.cache_hits += lease.hit
                plan.cache_seconds += lease.seconds
                res.disks.append(Disk(BlockDevice(f"kl{h}{i:02d}", lease.path, True, driver, f"kl{h}{i:02d}"),
                                      "layer"))
            plan.lowers = len(res.disks)
            path = scratch.scratch_path(st.scratch_dir, sandbox_id, container_id)
            res.disks.append(Disk(BlockDevice(f"ks{h}", path, False, driver, f"ks{h}"), "scratch"))
        elif isinstance(src, layers.BlockSnapshot):
            plan.rootfs_mode = "snapshot"
            plan.snapshot_fstype, plan.snapshot_options = src.fstype, src.options
            res.disks.append(Disk(BlockDevice(f"kr{h}", src.device, False, driver, f"kr{h}"), "snapshot"))
            res.claims.append((claims.claim_name_for_path(src.device), f"rootfs device {src.device}"))
        for j, disk in enumerate(reqs.disks):
            dev_id = f"kv{h}{j:02d}"
            res.disks.append(Disk(BlockDevice(dev_id, disk.source, disk.readonly, st.data_disk_driver, dev_id),
                                  "volume"))
            res.claims.append((claims.claim_name_for_path(disk.source), f"data disk {disk.source}"))
        _plan_vfio(cfg, res, reqs, h, cold)
    except BaseException:
        for lease in res.leases:
            lease.release()
        raise
    if res.disks or res.vfio:
        plan.resource = res
    return plan


def _plan_vfio(cfg: Any, res: ContainerStorage, reqs: requests.ContainerRequests, h: str, cold: bool) -> None:
    if not reqs.vfio:
        return
    port = cfg.hypervisor.cold_plug_vfio if cold else cfg.hypervisor.hot_plug_vfio
    if port == "no-port":
        raise FailedPrecondition(f"VFIO device {reqs.vfio[0].host_path}: {VFIO_NO_PORT}")
    k = 0
    for req in reqs.vfio:
        group, funcs = sysfs.group_of_device_path(req.host_path)
        if not cfg.storage.vfio_bind:
            sysfs.require_vfio_bound(funcs, group)
        for fn in funcs:
            res.vfio.append(VfioFunction(VfioDevice(f"kf{h}{k:02d}", fn.bdf), fn.kind, group, fn.driver,
                                         req.container_path))
            res.claims.append((claims.claim_name_for_pci(fn.bdf), f"PCI device {fn.bdf} (VFIO group {group})"))
            k += 1


def _source(dev: BlockDevice) -> str:
    """Disks the host emulates are found by the serial it gave them (PCI paths are for
    passed-through functions, whose serial is the hardware's)."""
    return f"{gs.SERIAL_PREFIX}{dev.serial or dev.id}"


@dataclass
class GuestView:
    """What the guest is told: Storage and Device dicts (kata-shaped), OCI rewrites."""

    root_path: str = ""
    storages: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    volumes: dict[str, tuple[str, bool]] = field(default_factory=dict)   # destination → (guest dir, ro)
    keep_devices: tuple[str, ...] = ()


def guest_view(plan: Plan, container_id: str) -> GuestView:
    res = plan.resource
    view = GuestView()
    if res is None:
        return view
    fmt = res.image_format
    if plan.rootfs_mode == "block":
        lowers = []
        for n, d in enumerate(x for x in res.disks if x.role in ("upper", "layer")):
            mp = gs.lower_dir(container_id, n)
            lowers.append(mp)
            view.storages.append({"driver": gs.storage_driver_for(d.dev.driver), "source": _source(d.dev),
                                  "fstype": fmt, "options": ["ro"], "mount_point": mp})
        sd = res.disk("scratch")
        base = gs.scratch_dir(container_id)
        view.storages.append({"driver": gs.storage_driver_for(sd.dev.driver), "source": _source(sd.dev),
                              "fstype": "ext4", "options": [], "mount_point": base})
        view.storages.append({"driver": gs.OVERLAY_DRIVER, "source": "overlay", "fstype": "overlay",
                              "options": [f"lowerdir={':'.join(lowers or [base + '/empty'])}",
                                          f"upperdir={base}/upper", f"workdir={base}/work"],
                              "mount_point": gs.block_rootfs(container_id)})
        view.root_path = gs.block_rootfs(container_id)
    elif plan.rootfs_mode == "snapshot":
        d = res.disk("snapshot")
        view.storages.append({"driver": gs.storage_driver_for(d.dev.driver), "source": _source(d.dev),
                              "fstype": plan.snapshot_fstype, "options": list(plan.snapshot_options),
                              "mount_point": gs.block_rootfs(container_id)})
        view.root_path = gs.block_rootfs(container_id)
    volumes = [d for d in res.disks if d.role == "volume"]
    keep = []
    for d, req in zip(volumes, plan.requests.disks):
        if req.mode == "mount":
            mp = gs.volume_dir(d.dev.id)
            options = [o for o in req.options if o not in ("ro", "rw")] + (["ro"] if req.readonly else [])
            view.storages.append({"driver": gs.storage_driver_for(d.dev.driver),
                                  "source": _source(d.dev), "fstype": req.fstype,
                                  "options": options, "mount_point": mp})
            view.volumes[req.destination] = (mp, req.readonly)
        else:
            view.devices.append({"id": d.dev.id, "type": "nvme" if d.dev.driver == "nvme" else "blk",
                                 "vm_path": _source(d.dev), "container_path": req.destination})
            keep.append(req.destination)
    nvme_mounts = list(plan.requests.nvme_mounts)
    for f in sorted(res.vfio, key=lambda f: f.dev.host):
        if f.kind == "nvme" and nvme_mounts:
            m = nvme_mounts.pop(0)
            mp = gs.volume_dir(f.dev.id)
            view.storages.append({"driver": "nvme", "source": f.guest_pci_path, "fstype": m.fstype,
                                  "options": list(m.options), "mount_point": mp})
            view.volumes[m.destination] = (mp, "ro" in m.options)
        else:
            view.devices.append({"id": f.dev.id, "type": "vfio-net" if f.kind == "net" else "vfio-pci",
                                 "vm_path": f.guest_pci_path, "container_path": f.container_path})
    view.keep_devices = tuple(keep)
    return view
