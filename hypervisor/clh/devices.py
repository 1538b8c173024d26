"""Cloud Hypervisor device hotplug and vCPU resize over the REST API (the
:class:`hypervisor.base.DeviceHotplug` capability, plus :meth:`DevicesMixin.resize_vcpus`).

* NIC: ``vm.add-net`` with the tap fds as SCM_RIGHTS (one queue pair per fd);
* disk: ``vm.add-disk`` (virtio-blk only, kata's queue count/size);
* VFIO: ``vm.add-device`` with the device's sysfs path.

The guest PCI path is the slot of the ``PciDeviceInfo.bdf`` CH answers (``0000:00:<slot>.0``;
CH uses no bridges, as kata relies on); an answer of another shape is an error and the device is
removed again, so a failed hotplug leaves nothing attached. Removal is ``vm.remove-device``, then
``vm.info``'s device tree is polled until the guest released the device.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from common.errors import DeadlineExceeded, InvalidArgument, KataColoError, NotFound
from hypervisor.base import AttachedDevice, BlockDevice, Device, NetDevice, VfioDevice, VmConfig
from hypervisor.clh import vmconfig
from hypervisor.clh.api import ClhApi

T = TypeVar("T")
REMOVE_POLL_INTERVAL = 0.05


class DevicesMixin:
    """Needs ``api``, ``_call``, ``_require_prepared``, ``_devices`` and ``_vcpus`` from the driver."""

    _devices: dict[str, str]
    _vcpus: int

    @property
    def api(self) -> ClhApi:  # provided by the driver
        raise NotImplementedError

    async def _call(self, what: str, call: Awaitable[T]) -> T:  # provided by the driver
        raise NotImplementedError

    def _require_prepared(self) -> tuple[VmConfig, object]:  # provided by the driver
        raise NotImplementedError

    async def add_device(self, dev: Device) -> AttachedDevice:
        vmconfig.check_device_id(dev.id)
        if dev.id in self._devices or dev.id == vmconfig.ROOTFS_DISK_ID:
            raise InvalidArgument(f"device {dev.id} already attached")
        api = self.api
        info: dict[str, Any] | None
        if isinstance(dev, NetDevice):
            body = vmconfig.net_config(dev, self._vcpus)
            info = await self._call("vm.add-net", api.add_net(body, dev.tap_fds))
            kind = "net"
        elif isinstance(dev, BlockDevice):
            info = await self._call("vm.add-disk", api.add_disk(vmconfig.disk_config(dev, self._vcpus)))
            kind = "block"
        elif isinstance(dev, VfioDevice):
            info = await self._call("vm.add-device", api.add_device(vmconfig.device_config(dev)))
            kind = "vfio"
        else:
            raise InvalidArgument(f"unsupported device type {type(dev).__name__}")
        self._devices[dev.id] = kind
        if info is None:  # 204: cold-added (no PCI address yet)
            return AttachedDevice(dev.id)
        try:
            if info["id"] != dev.id:
                raise InvalidArgument(f"cloud-hypervisor attached {dev.id} as {info['id']!r}")
            return AttachedDevice(dev.id, vmconfig.guest_pci_path(info["bdf"]))
        except KataColoError:
            with contextlib.suppress(KataColoError):
                await self._call("vm.remove-device", api.remove_device(str(info["id"])))
            self._devices.pop(dev.id, None)
            raise

    async def remove_device(self, dev_id: str, timeout: float = 10.0) -> None:
        if dev_id not in self._devices:
            raise NotFound(f"device {dev_id} is not attached")
        api = self.api
        await self._call("vm.remove-device", api.remove_device(dev_id))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while dev_id in _device_tree(await self._call("vm.info", api.info())):
            if loop.time() > deadline:
                raise DeadlineExceeded(f"the guest did not release device {dev_id} within {timeout:g}s")
            await asyncio.sleep(REMOVE_POLL_INTERVAL)
        del self._devices[dev_id]

    async def resize_vcpus(self, count: int) -> int:
        """``vm.resize desired_vcpus`` (kata's ResizeVCPUs: capped at max_vcpus; 429 retried by
        the API client). Returns the vCPU count the VM now has."""
        cfg, _ = self._require_prepared()
        if count < 1:
            raise InvalidArgument(f"cannot resize to {count} vCPUs")
        count = min(count, vmconfig.max_vcpus(cfg))
        if count != self._vcpus:
            await self._call("vm.resize", self.api.resize(desired_vcpus=count))
            self._vcpus = count
        return count


def _device_tree(info: dict[str, Any]) -> dict[str, Any]:
    tree = info.get("device_tree")
    return tree if isinstance(tree, dict) else {}
