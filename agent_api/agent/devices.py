"""Find the guest device behind a host-side name, and set up passed-through PCI devices.

Names (:mod:`common.guest_storage`): ``serial:<s>`` — a disk whose serial the host set
(virtio-blk ``/sys/block/vdX/serial``, NVMe ``/sys/block/nvmeXnY/device/serial``, SCSI
``/sys/block/sdX/device/vpd_pg80``); a kata guest PCI path ``02/00`` — walked from the root bus
through each bridge's secondary bus (``/sys/bus/pci/devices/0000:00:02.0/pci_bus/*``) to the
device; a SCSI address ``<target>:<lun>``. Hot-plugged devices appear asynchronously: lookups
poll sysfs until ``timeout``. All paths are under ``sys_root``/``dev_root`` (tests use a fake tree).

Passed-through NICs (VFIO ENIs) are brought up and their MSI/MSI-X interrupts bound to the vCPUs
of one co-location priority (``high`` unless the Device says ``irq-priority=<name>``; the mapping
is the agent's ``/run/kata-colo/vcpu-priorities.json``), so the online-facing NIC's interrupts
never land on the vCPUs the host runs at low priority.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
from dataclasses import dataclass

from common import guest_storage as gs
from common.errors import DeadlineExceeded, InvalidArgument, ResourceError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
POLL = 0.05
VCPU_PRIORITIES = "/run/kata-colo/vcpu-priorities.json"
MAX_JSON = 64 << 10


@dataclass(frozen=True)
class SysRoots:
    sys: str = "/sys"
    dev: str = "/dev"
    proc: str = "/proc"


ROOTS = SysRoots()


def _read(path: str, limit: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return b""


def _serial_of(block: str, roots: SysRoots) -> str:
    base = f"{roots.sys}/block/{block}"
    if block.startswith("sd"):
        raw = _read(f"{base}/device/vpd_pg80")
        raw = raw[4:] if len(raw) > 4 else b""
    else:
        raw = _read(f"{base}/serial") or _read(f"{base}/device/serial")
    return raw.replace(b"\x00", b"").decode(errors="replace").strip()


def block_by_serial(serial: str, roots: SysRoots = ROOTS) -> str | None:
    """The block device name (``vdb``) whose serial is ``serial``, or None (yet)."""
    try:
        names = sorted(os.listdir(f"{roots.sys}/block"))
    except OSError:
        return None
    for name in names:
        if name.startswith(("vd", "sd", "nvme")) and _serial_of(name, roots) == serial:
            return name
    return None


def pci_device_by_path(pci_path: str, roots: SysRoots = ROOTS) -> str | None:
    """The sysfs directory of the PCI device at kata guest PCI path ``pci_path`` (or None)."""
    if not gs.PCI_PATH_RE.fullmatch(pci_path):
        raise InvalidArgument(f"bad guest PCI path {pci_path!r}")
    bus_dir = f"{roots.sys}/bus/pci/devices"
    domain_bus = "0000:00"
    current = ""
    slots = pci_path.split("/")
    for i, slot in enumerate(slots):
        current = f"{bus_dir}/{domain_bus}:{slot}.0"
        if not os.path.isdir(current):
            return None
        if i < len(slots) - 1:
            domain_bus = _secondary_bus(current)
            if not domain_bus:
                return None  # not a bridge (yet)
    return os.path.realpath(current)


def _secondary_bus(dev_dir: str) -> str:
    try:
        buses = sorted(os.listdir(f"{dev_dir}/pci_bus"))
    except OSError:
        return ""
    return buses[0] if buses else ""


def _block_below(dev_dir: str) -> str | None:
    """A whole-disk block device below a PCI device dir: virtio-blk ``virtioN/block/vda``,
    NVMe ``nvme/nvme0/nvme0n1`` (any dir whose ``subsystem`` is ``block`` and that is not a
    partition)."""
    for dirpath, dirnames, _ in os.walk(dev_dir):
        for name in sorted(dirnames):
            d = os.path.join(dirpath, name)
            if (os.path.basename(os.path.realpath(os.path.join(d, "subsystem"))) == "block"
                    and not os.path.exists(os.path.join(d, "partition"))):
                return name
        if dirpath.count("/") - dev_dir.count("/") > 4:
            dirnames[:] = []
    return None


def net_below(dev_dir: str) -> str | None:
    for dirpath, dirnames, _ in os.walk(dev_dir):
        if os.path.basename(dirpath) == "net" and dirnames:
            return sorted(dirnames)[0]
        if dirpath.count("/") - dev_dir.count("/") > 4:
            dirnames[:] = []
    return None


def block_by_scsi_addr(addr: str, roots: SysRoots = ROOTS) -> str | None:
    target, lun = addr.split(":")
    try:
        entries = os.listdir(f"{roots.sys}/bus/scsi/devices")
    except OSError:
        return None
    for e in sorted(entries):
        parts = e.split(":")
        if len(parts) == 4 and parts[2] == target and parts[3] == lun:
            try:
                return sorted(os.listdir(f"{roots.sys}/bus/scsi/devices/{e}/block"))[0]
            except (OSError, IndexError):
                return None
    return None


def resolve_block(source: str, roots: SysRoots = ROOTS) -> str | None:
    """``/dev/<name>`` of the disk ``source`` names, or None while it has not appeared."""
    if source.startswith(gs.SERIAL_PREFIX):
        serial = source[len(gs.SERIAL_PREFIX):]
        if not gs.SERIAL_RE.fullmatch(serial):
            raise InvalidArgument(f"bad disk serial {serial!r}")
        name = block_by_serial(serial, roots)
    elif gs.SCSI_ADDR_RE.fullmatch(source):
        name = block_by_scsi_addr(source, roots)
    elif gs.PCI_PATH_RE.fullmatch(source):
        dev = pci_device_by_path(source, roots)
        name = _block_below(dev) if dev else None
    else:
        raise InvalidArgument(f"bad disk source {source!r} (serial:<s>, a PCI path or a SCSI address)")
    return f"{roots.dev}/{name}" if name else None


async def wait_block(source: str, timeout: float = DEFAULT_TIMEOUT, roots: SysRoots = ROOTS) -> str:
    """Poll until the disk appears and its device node exists; DeadlineExceeded otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        node = resolve_block(source, roots)
        if node is not None:
            try:
                if stat.S_ISBLK(os.stat(node).st_mode):
                    return node
            except FileNotFoundError:
                pass
        if loop.time() > deadline:
            raise DeadlineExceeded(f"disk {source} did not appear in the guest within {timeout:.0f}s")
        await asyncio.sleep(POLL)


async def wait_pci(pci_path: str, timeout: float = DEFAULT_TIMEOUT, roots: SysRoots = ROOTS) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        dev = pci_device_by_path(pci_path, roots)
        if dev is not None:
            return dev
        if loop.time() > deadline:
            raise DeadlineExceeded(f"PCI device {pci_path} did not appear in the guest within {timeout:.0f}s")
        await asyncio.sleep(POLL)


def device_numbers(node: str) -> tuple[int, int]:
    st = os.stat(node)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


# -- passed-through NICs -------------------------------------------------------------------


def priority_vcpus(priority: str, path: str = VCPU_PRIORITIES) -> list[int]:
    """The vCPUs of co-location priority ``priority`` ([] when the pod has none)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_JSON))
        cpus = doc.get("priorities", {}).get(priority, [])
        return sorted(int(c) for c in cpus)
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def msi_irqs(dev_dir: str) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(f"{dev_dir}/msi_irqs") if n.isdigit())
    except OSError:
        return []


def bind_irqs(irqs: list[int], cpus: list[int], roots: SysRoots = ROOTS) -> list[int]:
    """Write ``cpus`` to each IRQ's ``smp_affinity_list``; the IRQs that took it."""
    if not cpus:
        return []
    text = ",".join(str(c) for c in cpus)
    done = []
    for irq in irqs:
        try:
            with open(f"{roots.proc}/irq/{irq}/smp_affinity_list", "w") as f:
                f.write(text)
            done.append(irq)
        except OSError as exc:  # managed IRQs (e.g. NVMe queues) refuse: not an error
            log.info("irq %d: affinity %s not set: %s", irq, text, exc.strerror)
    return done


async def setup_nic(pci_path: str, options: list[str], timeout: float = DEFAULT_TIMEOUT,
                    roots: SysRoots = ROOTS, priorities_path: str = VCPU_PRIORITIES) -> str:
    """A passed-through NIC: wait for its netdev, bring it up, bind its IRQs; its name."""
    opts = dict(o.split("=", 1) for o in options if "=" in o)
    priority = opts.get("irq-priority", "high")
    dev = await wait_pci(pci_path, timeout, roots)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    name = net_below(dev)
    while name is None:
        if loop.time() > deadline:
            raise DeadlineExceeded(f"PCI device {pci_path} has no network interface")
        await asyncio.sleep(POLL)
        name = net_below(dev)
    res = await asyncio.to_thread(subprocess.run, ["ip", "link", "set", "dev", name, "up"],
                                  capture_output=True, timeout=10)
    if res.returncode != 0:
        raise ResourceError(f"ip link set {name} up: {res.stderr.decode(errors='replace').strip()}")
    cpus = priority_vcpus(priority, priorities_path)
    bound = bind_irqs(msi_irqs(dev), cpus, roots)
    log.info("NIC %s (%s) up; IRQs %s bound to %s vCPUs %s", name, pci_path, bound, priority, cpus)
    return name

