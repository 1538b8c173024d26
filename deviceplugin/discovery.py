"""Find the PCI functions bound to vfio-pci and group them into resources (pure sysfs reads
under a :class:`hypervisor.host.HostPaths` root, so tests use a fake tree).

A function is an NVMe controller (PCI class 0x010802) or an ENI NIC (class 0x0200xx, optionally
only from the vendors given); everything else bound to vfio-pci is ignored. A device's ID is its
PCI address (what the CDI name and the shim's claims use); it is healthy while it is still on
vfio-pci and its ``/dev/vfio/<group>`` node exists.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from hypervisor.host import HOST, HostPaths
from shim.resources.vfio import sysfs

KINDS = ("nvme", "eni")


@dataclass(frozen=True)
class VfioDevice:
    id: str             # PCI address, e.g. 0000:3b:00.0
    kind: str           # nvme | eni
    group: str          # IOMMU group → /dev/vfio/<group>
    numa_node: int = -1

    @property
    def vfio_node(self) -> str:
        return f"/dev/vfio/{self.group}"


def _kind(fn: sysfs.PciFunction, eni_vendors: Iterable[int]) -> str:
    vendors = set(eni_vendors)
    if fn.kind == "nvme":
        return "nvme"
    if fn.kind == "net" and (not vendors or fn.vendor in vendors):
        return "eni"
    return ""


def scan(paths: HostPaths = HOST, eni_vendors: Iterable[int] = ()) -> list[VfioDevice]:
    """Every NVMe/ENI function bound to vfio-pci whose /dev/vfio node exists, by address."""
    drv = paths(f"/sys/bus/pci/drivers/{sysfs.VFIO_DRIVER}")
    try:
        names = sorted(os.listdir(drv))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            sysfs.check_bdf(name)
            fn = sysfs.pci_function(name, paths)
        except Exception:  # noqa: BLE001 - not a device link (bind, unbind, new_id, module)
            continue
        kind = _kind(fn, eni_vendors)
        if not kind or fn.driver != sysfs.VFIO_DRIVER or not fn.iommu_group:
            continue
        if not os.path.exists(paths(f"/dev/vfio/{fn.iommu_group}")):
            continue
        out.append(VfioDevice(fn.bdf, kind, fn.iommu_group, fn.numa_node))
    return out
