"""The hypervisor contract the sandbox uses, and the plain data it speaks in.

A driver (QEMU today, Cloud Hypervisor later) implements :class:`Hypervisor`. Everything here is
VMM-neutral: no QMP, no REST. The lifecycle is ``prepare(cfg)`` → ``start(timeout)`` → (``pause`` /
``resume`` / devices / memory) → ``stop()`` → ``cleanup()``; ``wait()`` resolves whenever the VMM
process exits, also when it dies on its own. ``cleanup()`` is idempotent and removes everything
``prepare``/``start`` created.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Union, runtime_checkable

Accel = Literal["auto", "kvm", "tcg"]
AgentTransport = Literal["virtio-serial", "vsock", "hybrid-vsock"]

#: vCPU index → host thread id (TID) of the thread running that vCPU.
VcpuThreads = dict[int, int]



@dataclass(frozen=True)
class SharedDir:
    """A host directory exported to the guest over virtio-9p under ``tag``."""

    tag: str
    host_path: str
    readonly: bool = False


@dataclass(frozen=True)
class NetDevice:
    """A virtio-net NIC backed by an already opened tap.

    ``tap_fds`` are open file descriptors of the tap, one per queue (more than one = multiqueue;
    the tap must have been opened with IFF_MULTI_QUEUE | IFF_VNET_HDR). The caller keeps ownership
    of the fds and closes them after ``start``/``add_device`` returned.
    """

    id: str
    mac: str
    tap_fds: tuple[int, ...]
    vhost: bool = False


@dataclass(frozen=True)
class VfioDevice:
    """A host PCI device (``host`` is its BDF, e.g. ``0000:3b:00.0``) passed through with VFIO."""

    id: str
    host: str


@dataclass(frozen=True)
class BlockDevice:
    """A raw block device or image file attached as virtio-blk."""

    id: str
    path: str
    readonly: bool = False


Device = Union[NetDevice, VfioDevice, BlockDevice]


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to boot one sandbox VM. Validated by the driver's ``prepare``.

    Sizes: ``memory_mib`` is boot RAM; ``max_memory_mib`` > ``memory_mib`` together with
    ``memory_slots`` > 0 enables DIMM hotplug (0 = no hotplug). ``max_vcpus`` 0 means
    ``vcpus``. ``cpu_model`` "" lets the driver choose (``max`` under TCG, ``host`` under KVM).
    ``vsock_cid`` is the guest CID when ``agent_channel`` is ``vsock``.
    """

    sandbox_id: str
    state_dir: str
    kernel: str
    initrd: str = ""
    image: str = ""
    kernel_params: str = ""
    vcpus: int = 1
    max_vcpus: int = 0
    memory_mib: int = 512
    max_memory_mib: int = 0
    memory_slots: int = 0
    accel: Accel = "auto"
    machine: str = "q35"
    cpu_model: str = ""
    shared_dirs: tuple[SharedDir, ...] = ()
    agent_channel: AgentTransport = "virtio-serial"
    vsock_cid: int = 0
    vsock_port: int = 1024
    balloon: bool = True
    pcie_root_ports: int = 0
    nics: tuple[NetDevice, ...] = ()
    hypervisor_path: str = "/usr/bin/qemu-system-x86_64"
    debug: bool = False
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentAddress:
    """Where the host reaches the guest agent.

    ``virtio-serial``: ``path`` is the host unix socket of the port. ``vsock``: ``cid`` + ``port``.
    ``hybrid-vsock``: ``path`` is the unix socket, ``port`` the guest port for ``CONNECT``.
    """

    transport: AgentTransport
    path: str = ""
    cid: int = 0
    port: int = 0


@dataclass(frozen=True)
class Capabilities:
    block_hotplug: bool = False
    net_hotplug: bool = False
    vfio_hotplug: bool = False
    multiqueue_net: bool = False
    memory_hotplug: bool = False
    balloon: bool = False
    vsock: bool = False
    shared_fs: str = ""


@dataclass(frozen=True)
class BalloonInfo:
    """``actual_bytes``: guest RAM as the balloon driver reports it (boot RAM − inflated).

    ``stats`` are the guest's virtio-balloon statistics (``stat-free-memory``, ...; only the ones
    the guest reported, empty until it did).
    """

    actual_bytes: int
    stats: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Hypervisor(Protocol):
    """One VM. Methods raise subclasses of common.errors.KataColoError."""

    async def prepare(self, cfg: VmConfig) -> None:
        """Validate ``cfg`` and create the per-VM state directory; starts nothing."""

    async def start(self, timeout: float) -> None:
        """Launch the VMM and return once its control channel answers and the VM runs."""

    async def stop(self, force: bool = False, timeout: float = 10.0) -> None:
        """Power the VM off (graceful first unless ``force``); returns when the VMM is gone."""

    async def wait(self) -> int:
        """Resolve with the VMM's return code when its process exits (negative = signal)."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def add_device(self, dev: Device) -> None: ...

    async def remove_device(self, dev_id: str) -> None: ...

    def agent_address(self) -> AgentAddress: ...

    async def vcpu_threads(self) -> VcpuThreads:
        """{vCPU index: host TID}, each TID verified to be a thread of :meth:`vmm_pid`."""

    def vmm_pid(self) -> int | None: ...

    def capabilities(self) -> Capabilities: ...

    async def resize_memory(self, target_mib: int) -> int:
        """Hot(un)plug memory towards ``target_mib``; returns the resulting size in MiB."""

    async def balloon(self, target_bytes: int) -> None:
        """Ask the guest to shrink/grow its usable RAM to ``target_bytes``."""

    async def balloon_info(self) -> BalloonInfo: ...

    async def cleanup(self) -> None:
        """Idempotent: kill a leftover VMM and remove every file ``prepare``/``start`` made."""
