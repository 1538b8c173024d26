"""ContainerStorage: the host objects one container's block storage needs, as a sandbox resource.

What it holds: read-only layer images (leases on the shared cache), the container's own uncached
images (its non-empty upper dir), its scratch disk, data disks (host block devices or image
files), and VFIO PCI functions. The journal record (written by the ResourceManager *before*
:meth:`before_boot`) names every file, claim and PCI function it may create or change, so
``delete`` after a crash undoes all of it from the record alone (:meth:`recover`).

Phases: :meth:`before_boot` takes the host-wide claims (a device is given to one sandbox only),
checks that every data disk opens, binds VFIO functions to vfio-pci when allowed (the original
driver journaled first), builds the uncached images and the scratch disk. For the sandbox's first
container (``cold``) it returns the disks and VFIO devices to cold-plug; otherwise
:meth:`after_boot` hot-plugs them one by one (each journaled once plugged). :meth:`teardown`
unplugs what it hot-plugged (waiting for DEVICE_DELETED) while the VM runs, then deletes the files,
gives VFIO functions back to their host driver and drops the claims; a failed attach is rolled
back by the manager through the same teardown.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, runtime_checkable

from common.errors import FailedPrecondition, InvalidArgument, KataColoError, ResourceError
from hypervisor.base import AttachedDevice, BlockDevice, DeviceHotplug, VfioDevice, VmPatch
from hypervisor.host import HOST, HostPaths
from shim.resources.blockdev import claims as claims_mod
from shim.resources.blockdev import mkimage, scratch
from shim.resources.blockdev.cache import LayerLease
from shim.resources.manager import ResourceContext
from shim.resources.vfio import sysfs

log = logging.getLogger(__name__)

UNPLUG_TIMEOUT = 20.0
VFIO_BALLOON_NOTE = ("QEMU disables balloon inflation and free page reporting while a VFIO device is "
                     "attached; memory elasticity must use virtio-mem")


@runtime_checkable
class PciPathLookup(Protocol):
    """A driver that can tell a cold-plugged device's guest PCI path (QEMU: ``query-pci``)."""

    async def guest_pci_path(self, dev_id: str) -> str: ...


@dataclass
class Disk:
    """One disk of the container. ``role``: layer | upper | scratch | snapshot | volume.
    ``build_from``: for ``upper``, the directory its image is built from in before_boot."""

    dev: BlockDevice
    role: str
    build_from: str = ""
    guest_pci_path: str = ""


@dataclass
class VfioFunction:
    dev: VfioDevice
    kind: str              # nvme | net | other (sysfs.PciFunction.kind)
    group: str
    original_driver: str   # the host driver before binding (vfio-pci = it already was)
    container_path: str = ""
    guest_pci_path: str = ""


@dataclass
class ContainerStorage:
    sandbox_id: str
    container_id: str
    disks: list[Disk] = field(default_factory=list)
    vfio: list[VfioFunction] = field(default_factory=list)
    leases: list[LayerLease] = field(default_factory=list)
    scratch_bytes: int = 0
    image_format: str = "erofs"
    claims_dir: str = claims_mod.DEFAULT_DIR
    claims: list[tuple[str, str]] = field(default_factory=list)   # (claim name, what it is)
    bind_vfio: bool = False
    cold: bool = False
    host_paths: HostPaths = HOST
    plugged: list[str] = field(default_factory=list)
    bound: list[str] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    _hv: Any = None

    kind: ClassVar[str] = "container-storage"

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> ContainerStorage | None:
        """Made per container by the storage provider (never from the sandbox spec alone)."""
        return None

    # -- journal ------------------------------------------------------------------------------

    def owned_files(self) -> list[str]:
        return [d.dev.path for d in self.disks if d.role in ("scratch", "upper")]

    def record(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "container_id": self.container_id,
                "files": self.owned_files(), "claims_dir": self.claims_dir,
                "claims": [name for name, _ in self.claims],
                "vfio": [{"bdf": f.dev.host, "original": f.original_driver} for f in self.vfio
                         if f.dev.host in self.bound],
                "plugged": list(self.plugged), "host_root": self.host_paths.root}

    # -- phases -------------------------------------------------------------------------------

    async def before_boot(self, ctx: ResourceContext) -> VmPatch | None:
        self._hv = ctx.hypervisor
        for name, what in self.claims:
            claims_mod.take(self.claims_dir, name, self.sandbox_id, what)
            self.taken.append(name)
        for d in self.disks:
            if d.role in ("volume", "snapshot"):
                await asyncio.to_thread(_check_opens, d.dev.path, d.dev.readonly)
        await asyncio.to_thread(self._prepare_vfio, ctx)
        for d in self.disks:
            if d.role == "upper":
                await asyncio.to_thread(mkimage.build, self.image_format, d.build_from, d.dev.path)
            elif d.role == "scratch":
                await asyncio.to_thread(scratch.create, d.dev.path, self.scratch_bytes)
        if not self.cold:
            return None
        return VmPatch(disks=tuple(d.dev for d in self.disks), vfio=tuple(f.dev for f in self.vfio))

    def _prepare_vfio(self, ctx: ResourceContext) -> None:
        if self.vfio:
            log.warning("container %s: VFIO %s: %s", self.container_id, [f.dev.host for f in self.vfio],
                        VFIO_BALLOON_NOTE)
        for f in self.vfio:
            fn = sysfs.pci_function(f.dev.host, self.host_paths)
            if fn.driver == sysfs.VFIO_DRIVER:
                continue
            if not self.bind_vfio:
                sysfs.require_vfio_bound([fn], f.group)
            f.original_driver = fn.driver
            self.bound.append(f.dev.host)
            ctx.persist()  # the original driver is journaled before the device changes hands
            sysfs.bind_vfio(f.dev.host, self.host_paths)
            log.info("container %s: %s bound to vfio-pci (was %s)", self.container_id, f.dev.host,
                     f.original_driver or "unbound")

    async def after_boot(self, ctx: ResourceContext) -> None:
        hv = ctx.hypervisor
        self._hv = hv
        if self.cold:
            if self.vfio and isinstance(hv, PciPathLookup):
                for f in self.vfio:
                    f.guest_pci_path = await hv.guest_pci_path(f.dev.id)
            return
        if not isinstance(hv, DeviceHotplug):
            raise FailedPrecondition(f"hypervisor {getattr(hv, 'name', '?')} cannot hot-plug devices")
        for d in self.disks:
            attached = await self._plug(hv, d.dev, ctx)
            d.guest_pci_path = attached.guest_pci_path
        for f in self.vfio:
            attached = await self._plug(hv, f.dev, ctx)
            f.guest_pci_path = attached.guest_pci_path
            if not f.guest_pci_path:
                raise ResourceError(f"VFIO device {f.dev.host}: no guest PCI path after hot-plug")

    async def _plug(self, hv: DeviceHotplug, dev: BlockDevice | VfioDevice, ctx: ResourceContext) -> AttachedDevice:
        attached = await hv.add_device(dev)
        self.plugged.append(dev.id)
        ctx.persist()
        return attached

    async def teardown(self) -> None:
        await self._unplug()
        for lease in self.leases:
            lease.release()
        self.leases = []
        await asyncio.to_thread(self._cleanup_host)

    async def _unplug(self) -> None:
        hv = self._hv
        failures = []
        for dev_id in reversed(list(self.plugged)):
            try:
                if isinstance(hv, DeviceHotplug):
                    await hv.remove_device(dev_id, timeout=UNPLUG_TIMEOUT)
            except FailedPrecondition:
                pass  # the VM is gone, and the device with it
            except KataColoError as exc:
                failures.append(f"{dev_id}: {exc}")
                continue
            self.plugged.remove(dev_id)
        if failures:  # the guest still holds them: keep files, drivers and claims as they are
            raise ResourceError(f"container {self.container_id}: unplug failed: " + "; ".join(failures))

    def _cleanup_host(self) -> None:
        _cleanup(self.owned_files(), [(f.dev.host, f.original_driver) for f in self.vfio
                                      if f.dev.host in self.bound],
                 self.claims_dir, self.taken, self.sandbox_id, self.host_paths)
        self.bound, self.taken = [], []

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        files = [str(p) for p in record.get("files") or []]
        for p in files:
            if not os.path.isabs(p) or not p.endswith((".img", ".erofs", ".ext4")):
                raise ResourceError(f"container-storage record names an odd file: {p!r}")
        vfio = [(str(v.get("bdf", "")), str(v.get("original", ""))) for v in record.get("vfio") or []]
        await asyncio.to_thread(_cleanup, files, vfio, str(record.get("claims_dir") or claims_mod.DEFAULT_DIR),
                                [str(c) for c in record.get("claims") or []], str(record.get("sandbox_id") or ""),
                                HostPaths(str(record.get("host_root") or "")))

    # -- guest view ---------------------------------------------------------------------------

    def disk(self, role: str, index: int = 0) -> Disk:
        found = [d for d in self.disks if d.role == role]
        return found[index]

    def with_cold(self, cold: bool) -> ContainerStorage:
        return replace(self, cold=cold)


def _check_opens(path: str, readonly: bool) -> None:
    """A data disk must open the way QEMU will open it (and, for a block device, not be in use
    on the host: O_EXCL fails on a mounted device)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FailedPrecondition(f"data disk {path} cannot be opened: {exc.strerror}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InvalidArgument(f"data disk {path} is neither a block device nor an image file")
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    if stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    try:
        os.close(os.open(path, flags))
    except OSError as exc:
        raise FailedPrecondition(f"data disk {path} cannot be opened: {exc.strerror}"
                                 + (" (mounted or in use on the host?)" if exc.errno == 16 else "")) from None


def _cleanup(files: list[str], vfio: list[tuple[str, str]], claims_dir: str, claim_names: list[str],
             sandbox_id: str, host_paths: HostPaths) -> None:
    errors = []
    for path in files:
        scratch.remove(path)
    for bdf, original in vfio:
        try:
            sysfs.restore(bdf, original, host_paths)
        except KataColoError as exc:
            errors.append(f"{bdf}: {exc}")
    if errors:  # claims stay with the device until its driver is back
        raise ResourceError("restoring host drivers failed: " + "; ".join(errors))
    for name in claim_names:
        with contextlib.suppress(InvalidArgument):
            claims_mod.release(claims_dir, name, sandbox_id)
