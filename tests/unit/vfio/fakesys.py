"""A fake sysfs tree for VFIO tests, with a tiny 'PCI core' that reacts to the writes the real
kernel reacts to (driver_override, <driver>/unbind, drivers_probe, <driver>/bind)."""
from __future__ import annotations

import os
from pathlib import Path

from hypervisor.host import HostPaths


class FakePci:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = HostPaths(str(root))
        self.writes: list[tuple[str, str]] = []
        (root / "sys/bus/pci/drivers").mkdir(parents=True)
        (root / "sys/bus/pci/devices").mkdir(parents=True)
        (root / "sys/bus/pci/drivers_probe").write_text("")
        self.vfio_loaded = True

    def add(self, bdf: str, group: str, class_code: int, driver: str = "", vendor: int = 0x8086) -> None:
        dev = self.root / "sys/devices/pci0000:00" / bdf
        dev.mkdir(parents=True)
        (dev / "vendor").write_text(f"0x{vendor:04x}\n")
        (dev / "device").write_text("0x0953\n")
        (dev / "class").write_text(f"0x{class_code:06x}\n")
        (dev / "numa_node").write_text("0\n")
        (dev / "driver_override").write_text("(null)\n")
        gdir = self.root / "sys/kernel/iommu_groups" / group / "devices"
        gdir.mkdir(parents=True, exist_ok=True)
        os.symlink(dev, gdir / bdf)
        os.symlink(self.root / "sys/kernel/iommu_groups" / group, dev / "iommu_group")
        os.symlink(dev, self.root / "sys/bus/pci/devices" / bdf)
        if driver:
            self._bind(bdf, driver)

    def _dev(self, bdf: str) -> Path:
        return self.root / "sys/bus/pci/devices" / bdf

    def _bind(self, bdf: str, driver: str) -> None:
        ddir = self.root / "sys/bus/pci/drivers" / driver
        ddir.mkdir(exist_ok=True)
        for f in ("bind", "unbind"):
            (ddir / f).touch()
        link = self._dev(bdf) / "driver"
        if link.is_symlink():
            self._unbind(bdf)
        os.symlink(ddir, link)
        os.symlink(self._dev(bdf), ddir / bdf)

    def _unbind(self, bdf: str) -> None:
        link = self._dev(bdf) / "driver"
        (Path(os.readlink(link)) / bdf).unlink()
        link.unlink()

    def driver(self, bdf: str) -> str:
        link = self._dev(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else ""

    def write(self, path: str, value: str) -> None:
        """sysfs._write replacement: record, then do what the kernel would."""
        rel = os.path.relpath(path, self.root)
        self.writes.append((rel, value))
        parts = rel.split("/")
        if rel.endswith("/driver_override"):
            (self.root / rel).write_text(value)
        elif rel.endswith("/driver/unbind"):
            self._unbind(value)
        elif rel == "sys/bus/pci/drivers_probe":
            override = (self._dev(value) / "driver_override").read_text().strip()
            if override and override != "(null)":
                if override == "vfio-pci" and not self.vfio_loaded:
                    return
                self._bind(value, override)
            else:
                self._bind(value, self.original[value])
        elif parts[-1] == "bind":
            self._bind(value, parts[-2])

    original: dict[str, str] = {}
