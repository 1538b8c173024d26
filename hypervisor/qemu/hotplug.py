"""QEMU device hotplug over QMP (the :class:`hypervisor.base.DeviceHotplug` capability).

PCI devices (virtio-net, virtio-blk, emulated NVMe, vfio-pci) each go on a free pre-created
``pcie-root-port`` (``[hypervisor.qemu] pcie_root_ports``); a virtio-scsi disk is a ``scsi-hd`` LUN
on the controller created at boot (``block_device_driver = "virtio-scsi"``) and needs no port.
The guest PCI path comes from ``query-pci`` after ``device_add`` (:meth:`guest_pci_path` also
answers for cold-plugged devices). A step that fails rolls back what the earlier steps added
(fds named, netdev/blockdev backends), so a failed hotplug leaves nothing — a vfio-pci
``device_add`` QEMU refuses (no such host device, group not viable) leaves the port free.
Removal waits for DEVICE_DELETED of exactly that id before the backend goes.

VFIO and memory: QEMU's VFIO container disables uncoordinated RAM discard, so while a VFIO device
is attached balloon inflation and free page reporting do nothing (hw/vfio/common.c). The driver
says so in its log and drops ``balloon`` from :meth:`memory_mechanisms` (memory elasticity then
falls back to virtio-mem or DIMMs, which stay coordinated).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from common.errors import InvalidArgument, KataColoError, NotFound, ResourceExhausted
from hypervisor.base import AttachedDevice, BlockDevice, Device, NetDevice, VfioDevice, VmConfig
from hypervisor.qemu import cmdline
from hypervisor.qemu.monitor import QmpMonitor, pci_path

log = logging.getLogger(__name__)

BALLOON_VFIO_NOTE = ("QEMU disables balloon inflation and free page reporting while a VFIO device "
                     "is attached (uncoordinated RAM discard); memory elasticity must use virtio-mem")


@dataclass
class Plugged:
    kind: str
    port: str
    backend: str


class HotplugMixin:
    """Needs ``self.monitor`` (QmpMonitor) and ``self._require_prepared()`` from the driver."""

    _devices: dict[str, Plugged]

    @property
    def monitor(self) -> QmpMonitor:  # provided by the driver
        raise NotImplementedError

    def _require_prepared(self) -> tuple[VmConfig, object]:  # provided by the driver
        raise NotImplementedError

    def _free_port(self) -> str:
        cfg, _ = self._require_prepared()
        used = {p.port for p in self._devices.values()}
        ports = cmdline.options_of(cfg).pcie_root_ports
        for i in range(ports):
            if f"rp{i}" not in used:
                return f"rp{i}"
        raise ResourceExhausted(f"no free pcie-root-port for hotplug ({ports} configured)")

    def vfio_attached(self) -> list[str]:
        """Ids of the VFIO devices the VM has now (cold-plugged and hot-plugged)."""
        cfg, _ = self._require_prepared()
        return [d.id for d in cfg.vfio] + [i for i, p in self._devices.items() if p.kind == "vfio"]

    def memory_mechanisms(self) -> tuple[str, ...]:
        """The memory mechanisms, without ``balloon`` while VFIO pins guest RAM."""
        mechanisms: tuple[str, ...] = super().memory_mechanisms()  # type: ignore[misc]
        if self.vfio_attached():
            return tuple(m for m in mechanisms if m != "balloon")
        return mechanisms

    async def add_device(self, dev: Device) -> AttachedDevice:
        cmdline.check_device_id(dev.id)
        if dev.id in self._devices:
            raise InvalidArgument(f"device {dev.id} already attached")
        mon = self.monitor
        if isinstance(dev, BlockDevice) and dev.driver == "virtio-scsi":
            await self._add_scsi_disk(mon, dev)
            return AttachedDevice(dev.id, "")
        port = self._free_port()
        if isinstance(dev, NetDevice):
            await self._add_nic(mon, dev, port)
        elif isinstance(dev, VfioDevice):
            cmdline.validate_vfio(dev)
            await mon.device_add("vfio-pci", dev.id, host=dev.host, bus=port)
            self._devices[dev.id] = Plugged("vfio", port, "")
            log.warning("VFIO device %s (%s) attached: %s", dev.id, dev.host, BALLOON_VFIO_NOTE)
        elif isinstance(dev, BlockDevice):
            await self._add_disk(mon, dev, port)
        else:
            raise InvalidArgument(f"unsupported device type {type(dev).__name__}")
        return AttachedDevice(dev.id, await self.guest_pci_path(dev.id))

    async def guest_pci_path(self, dev_id: str) -> str:
        """kata's guest PCI path of device ``dev_id`` ("" when QEMU cannot say)."""
        try:
            return pci_path(await self.monitor.query_pci(), dev_id)
        except KataColoError:
            return ""

    async def _add_nic(self, mon: QmpMonitor, dev: NetDevice, port: str) -> None:
        cmdline.validate_nic(dev)
        backend = f"{dev.id}-net"
        names = [f"{dev.id}-fd{i}" for i in range(len(dev.tap_fds))]
        sent: list[str] = []
        try:
            for fd, name in zip(dev.tap_fds, names):
                await mon.send_fd(fd, name)
                sent.append(name)
            props: dict[str, object] = {"vhost": dev.vhost}
            if len(names) == 1:
                props["fd"] = names[0]
            else:
                props["fds"] = ":".join(names)
            await mon.netdev_add("tap", backend, **props)
        except KataColoError:
            for name in sent:  # netdev_add consumed none of them
                with contextlib.suppress(KataColoError):
                    await mon.closefd(name)
            raise
        dev_props: dict[str, object] = {"netdev": backend, "mac": dev.mac, "bus": port}
        if len(names) > 1:
            dev_props.update(mq=True, vectors=2 * len(names) + 2)
        try:
            await mon.device_add("virtio-net-pci", dev.id, **dev_props)
        except KataColoError:
            with contextlib.suppress(KataColoError):
                await mon.netdev_del(backend)
            raise
        self._devices[dev.id] = Plugged("net", port, backend)

    async def _blockdev(self, mon: QmpMonitor, dev: BlockDevice) -> str:
        cmdline.validate_disk(dev)
        backend = f"{dev.id}-blk"
        await mon.blockdev_add({"driver": "raw", "node-name": backend, "read-only": dev.readonly,
                                "file": {"driver": "file", "filename": dev.path,
                                         "read-only": dev.readonly}})
        return backend

    async def _add_disk(self, mon: QmpMonitor, dev: BlockDevice, port: str) -> None:
        backend = await self._blockdev(mon, dev)
        props: dict[str, object] = {"drive": backend, "bus": port}
        if dev.serial or dev.driver == "nvme":
            props["serial"] = dev.serial or dev.id
        try:
            await mon.device_add("nvme" if dev.driver == "nvme" else "virtio-blk-pci", dev.id, **props)
        except KataColoError:
            with contextlib.suppress(KataColoError):
                await mon.blockdev_del(backend)
            raise
        self._devices[dev.id] = Plugged("block", port, backend)

    async def _add_scsi_disk(self, mon: QmpMonitor, dev: BlockDevice) -> None:
        cfg, _ = self._require_prepared()
        if not cmdline.needs_scsi_controller(cfg):
            raise InvalidArgument("virtio-scsi hot-plug needs block_device_driver = \"virtio-scsi\" "
                                  "(the controller is created at boot)")
        backend = await self._blockdev(mon, dev)
        props: dict[str, object] = {"drive": backend, "bus": f"{cmdline.SCSI_CONTROLLER}.0"}
        if dev.serial:
            props["serial"] = dev.serial
        try:
            await mon.device_add("scsi-hd", dev.id, **props)
        except KataColoError:
            with contextlib.suppress(KataColoError):
                await mon.blockdev_del(backend)
            raise
        self._devices[dev.id] = Plugged("block", "", backend)

    async def remove_device(self, dev_id: str, timeout: float = 10.0) -> None:
        plugged = self._devices.get(dev_id)
        if plugged is None:
            raise NotFound(f"device {dev_id} is not attached")
        await self.monitor.device_del(dev_id, timeout=timeout)
        del self._devices[dev_id]
        if plugged.kind == "net":
            await self.monitor.netdev_del(plugged.backend)
        elif plugged.kind == "block":
            await self.monitor.blockdev_del(plugged.backend)
