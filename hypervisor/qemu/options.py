"""QEMU-only ``[hypervisor.qemu]`` keys (kata's names), carried in ``VmConfig.options``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.errors import ConfigError
from hypervisor.host import ACCELS

MACHINES = ("q35", "pc")
NINEP_SECURITY_MODELS = ("none", "mapped-xattr")
#: virtio-mem block sizes (a power of two ≥ the host THP size, 2 MiB on x86-64).
VIRTIO_MEM_BLOCKS_MIB = (2, 4, 8, 16, 32, 64, 128)
#: kata's ``block_device_driver`` values QEMU serves here (the container rootfs disks).
BLOCK_DEVICE_DRIVERS = ("virtio-blk", "virtio-scsi")


@dataclass(frozen=True)
class QemuOptions:
    """``accel`` auto|kvm|tcg (auto = KVM only where the CPU has vmx/svm); ``cpu_model`` "" =
    ``max`` under TCG, ``host`` under KVM; ``memory_slots`` DIMM slots for memory hotplug;
    ``enable_balloon`` a virtio-balloon device (deflate-on-oom); ``disable_vhost_net`` keeps the
    NIC datapath in QEMU even under KVM; ``pcie_root_ports`` pre-created ports for hot-plugged
    PCIe devices (VFIO, NVMe); ``ninep_security_model`` QEMU's 9p ``security_model`` for the
    sandbox share: ``none`` (default) passes owners and modes through — the host side of the
    share is kept safe by 0700 directories and ``nosuid,nodev`` binds; ``mapped-xattr`` stores
    what the guest writes as plain 0600 files with the owner and mode in xattrs, but then host
    symlinks (every image's /bin) do not resolve in the guest, so it suits only shares that hold
    no image content. ``reclaim_guest_freed_memory`` (kata's key) gives the balloon device free
    page reporting: pages the guest frees go back to the host. ``enable_virtio_mem`` (kata's key)
    puts the hot-pluggable memory (``default_maxmemory`` − ``default_memory``) behind one
    virtio-mem device that grows and shrinks live in ``virtio_mem_block_mib`` blocks, instead of
    pc-dimm slots (which only grow). ``tcg_tb_size`` is the TCG translation cache in MiB (0 =
    QEMU's default, 1 GiB of address space that fills as guest code is translated; smaller costs
    retranslation). ``block_device_driver`` (kata's key) is the controller of the block rootfs
    disks: ``virtio-blk`` (one PCI device each; hot-plug needs a free root port) or
    ``virtio-scsi`` (LUNs on one controller created at boot; hot-plug needs no port)."""

    DEFAULT_PATH: ClassVar[str] = "/usr/bin/qemu-system-x86_64"

    machine_type: str = "q35"
    accel: str = "auto"
    cpu_model: str = ""
    memory_slots: int = 10
    enable_virtio_mem: bool = False
    virtio_mem_block_mib: int = 2
    enable_balloon: bool = True
    disable_vhost_net: bool = False
    pcie_root_ports: int = 0
    ninep_security_model: str = "none"
    reclaim_guest_freed_memory: bool = False
    tcg_tb_size: int = 0
    block_device_driver: str = "virtio-blk"

    def validate(self, where: str = "hypervisor.qemu") -> QemuOptions:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"invalid configuration: {where}.{message}")

        check(self.machine_type in MACHINES, f"machine_type must be one of {MACHINES}")
        check(self.accel in ACCELS, f"accel must be one of {ACCELS}, not {self.accel!r}")
        check(0 <= self.memory_slots <= 255, "memory_slots must be 0..255")
        check(self.virtio_mem_block_mib in VIRTIO_MEM_BLOCKS_MIB,
              f"virtio_mem_block_mib must be one of {VIRTIO_MEM_BLOCKS_MIB}")
        check(0 <= self.pcie_root_ports <= 32, "pcie_root_ports must be 0..32")
        check(not self.pcie_root_ports or self.machine_type == "q35", "pcie_root_ports needs machine_type q35")
        check(self.ninep_security_model in NINEP_SECURITY_MODELS,
              f"ninep_security_model must be one of {NINEP_SECURITY_MODELS}")
        check(0 <= self.tcg_tb_size <= 4096, "tcg_tb_size must be 0..4096 (MiB)")
        check(self.block_device_driver in BLOCK_DEVICE_DRIVERS,
              f"block_device_driver must be one of {BLOCK_DEVICE_DRIVERS}")
        return self
