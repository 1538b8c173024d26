"""VFIO on the host's sysfs: IOMMU groups, PCI functions, and binding them to ``vfio-pci``.

Every path goes through :class:`hypervisor.host.HostPaths` (tests use a fake sysfs root). Kata's
model (src/runtime/pkg/device/drivers/vfio.go): a ``/dev/vfio/<group>`` device node stands for
every PCI function of IOMMU group ``<group>`` (``/sys/kernel/iommu_groups/<g>/devices/*``); PCI
bridges in the group are skipped (they stay with the host); each remaining function must be bound
to ``vfio-pci`` before QEMU can open the group. An iommufd cdev ``/dev/vfio/devices/vfioN``
stands for exactly one function (``/sys/class/vfio-dev/vfioN/device``).

Binding (when the configuration allows it) is the kernel's documented sequence: write
``vfio-pci`` to the function's ``driver_override``, unbind it from its current driver, then ask
the PCI core to probe it (``drivers_probe``). :func:`restore` undoes it: unbind from vfio-pci,
clear the override, re-probe, so the original host driver (recorded before binding) takes it back.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceError
from hypervisor.host import HOST, HostPaths

VFIO_DRIVER = "vfio-pci"
_BDF = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_GROUP = re.compile(r"[0-9]{1,6}")
_CDEV = re.compile(r"vfio[0-9]{1,6}")
PCI_CLASS_BRIDGE = 0x0604
PCI_CLASS_NVME = 0x010802
PCI_CLASS_ETHERNET = 0x0200


@dataclass(frozen=True)
class PciFunction:
    """One PCI function: ``class_code`` is the 24-bit class (0x010802 = NVMe, 0x0200xx = NIC)."""

    bdf: str
    vendor: int
    device: int
    class_code: int
    driver: str
    iommu_group: str
    numa_node: int = -1

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 8 == PCI_CLASS_BRIDGE

    @property
    def kind(self) -> str:
        """``nvme``, ``net`` or ``other``."""
        if self.class_code == PCI_CLASS_NVME:
            return "nvme"
        if self.class_code >> 8 == PCI_CLASS_ETHERNET:
            return "net"
        return "other"


def check_bdf(bdf: str) -> str:
    b = bdf.lower()
    if not _BDF.fullmatch(b):
        raise InvalidArgument(f"bad PCI address {bdf!r} (want dddd:bb:dd.f)")
    return b


def check_group(group: str) -> str:
    if not _GROUP.fullmatch(group):
        raise InvalidArgument(f"bad IOMMU group {group!r}")
    return group


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read(4096).strip()


def _hex(path: str) -> int:
    try:
        return int(_read(path), 16)
    except (OSError, ValueError):
        return 0


def _link_name(path: str) -> str:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def pci_function(bdf: str, paths: HostPaths = HOST) -> PciFunction:
    bdf = check_bdf(bdf)
    base = paths(f"/sys/bus/pci/devices/{bdf}")
    if not os.path.isdir(base):
        raise NotFound(f"PCI device {bdf} does not exist")
    try:
        numa = int(_read(f"{base}/numa_node"))
    except (OSError, ValueError):
        numa = -1
    return PciFunction(bdf=bdf, vendor=_hex(f"{base}/vendor"), device=_hex(f"{base}/device"),
                       class_code=_hex(f"{base}/class"), driver=_link_name(f"{base}/driver"),
                       iommu_group=_link_name(f"{base}/iommu_group"), numa_node=numa)


def group_functions(group: str, paths: HostPaths = HOST) -> list[PciFunction]:
    """The non-bridge PCI functions of IOMMU group ``group``, by address."""
    group = check_group(group)
    gdir = paths(f"/sys/kernel/iommu_groups/{group}/devices")
    try:
        names = sorted(os.listdir(gdir))
    except FileNotFoundError:
        raise NotFound(f"VFIO group {group} does not exist (no {gdir})") from None
    funcs = [pci_function(n, paths) for n in names if _BDF.fullmatch(n)]
    funcs = [f for f in funcs if not f.is_bridge]
    if not funcs:
        raise NotFound(f"VFIO group {group} has no PCI function to pass through")
    return funcs


def group_of_device_path(path: str, paths: HostPaths = HOST) -> tuple[str, list[PciFunction]]:
    """``/dev/vfio/<g>`` → (g, its functions); ``/dev/vfio/devices/vfioN`` → (its group, [it])."""
    norm = os.path.normpath(path)
    head, name = os.path.split(norm)
    if head == "/dev/vfio" and _GROUP.fullmatch(name):
        return name, group_functions(name, paths)
    if head == "/dev/vfio/devices" and _CDEV.fullmatch(name):
        bdf = _link_name(paths(f"/sys/class/vfio-dev/{name}/device"))
        if not bdf:
            raise NotFound(f"VFIO device {path} does not exist")
        fn = pci_function(bdf, paths)
        return fn.iommu_group, [fn]
    raise InvalidArgument(f"{path} is not a VFIO group or device node")


def is_vfio_path(path: str) -> bool:
    norm = os.path.normpath(path)
    return norm.startswith("/dev/vfio/") and norm != "/dev/vfio/vfio"


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError as exc:
        raise ResourceError(f"write {value.strip()!r} to {path}: {exc.strerror or exc}") from None


def bind_vfio(bdf: str, paths: HostPaths = HOST) -> str:
    """Bind ``bdf`` to vfio-pci; returns the driver it had ("" = none). No-op when bound."""
    fn = pci_function(bdf, paths)
    if fn.driver == VFIO_DRIVER:
        return VFIO_DRIVER
    base = paths(f"/sys/bus/pci/devices/{fn.bdf}")
    _write(f"{base}/driver_override", VFIO_DRIVER)
    if fn.driver:
        _write(f"{base}/driver/unbind", fn.bdf)
    _write(paths("/sys/bus/pci/drivers_probe"), fn.bdf)
    now = pci_function(bdf, paths).driver
    if now != VFIO_DRIVER:
        raise ResourceError(f"PCI device {fn.bdf} did not bind to {VFIO_DRIVER} (driver now {now or 'none'}; "
                            "is the vfio-pci module loaded?)")
    return fn.driver


def restore(bdf: str, original: str, paths: HostPaths = HOST) -> None:
    """Give ``bdf`` back to the host: off vfio-pci, override cleared, re-probed (idempotent)."""
    if original == VFIO_DRIVER:
        return  # it was on vfio-pci before we came
    try:
        fn = pci_function(bdf, paths)
    except NotFound:
        return  # the device is gone (hot-removed): nothing to give back
    base = paths(f"/sys/bus/pci/devices/{fn.bdf}")
    if fn.driver == VFIO_DRIVER:
        _write(f"{base}/driver/unbind", fn.bdf)
    _write(f"{base}/driver_override", "\n")
    if original and pci_function(bdf, paths).driver != original:
        _write(paths("/sys/bus/pci/drivers_probe"), fn.bdf)


def require_vfio_bound(funcs: list[PciFunction], group: str) -> None:
    bad = [f"{f.bdf} ({f.driver or 'no driver'})" for f in funcs if f.driver != VFIO_DRIVER]
    if bad:
        raise FailedPrecondition(f"VFIO group {group}: not bound to {VFIO_DRIVER}: {', '.join(bad)} "
                                 "(bind them, or set [storage] vfio_bind = true)")
