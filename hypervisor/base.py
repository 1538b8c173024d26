"""The hypervisor contract the sandbox uses, and the plain data it speaks in.

A driver (``hypervisor.qemu``, ``hypervisor.clh``) implements the small core protocol
:class:`Hypervisor`; what only some VMMs can do is a separate capability protocol the sandbox asks
for with ``isinstance`` (:class:`PauseResume`, :class:`DeviceHotplug`, :class:`MemoryControl`,
:class:`Snapshot`, :class:`HandOver`, :class:`VmmMetrics`, :class:`GuestConsole`). Everything here
is VMM-neutral: no QMP, no REST. A driver's own ``[hypervisor.<name>]`` options travel in
:attr:`VmConfig.options` as the driver's dataclass; drivers are found by name in
:mod:`hypervisor.registry`.

Lifecycle: ``prepare(cfg)`` → ``start(timeout)`` → (capabilities) → ``stop()`` → ``cleanup()``;
``wait()`` resolves whenever the VMM process exits, also when it dies on its own. ``cleanup()`` is
idempotent and removes everything ``prepare``/``start`` created. :meth:`Hypervisor.record` is
what the classmethod :meth:`Hypervisor.recover` needs to kill a leftover VMM and remove its files
from a fresh process (``delete`` after a shim crash); the sandbox persists it before ``start``.

Errors are :mod:`common.errors` classes (HypervisorError for a VMM that fails or refuses).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

AgentTransport = Literal["virtio-serial", "vsock", "hybrid-vsock"]

#: vCPU index → host thread id (TID) of the thread running that vCPU.
VcpuThreads = dict[int, int]


@dataclass(frozen=True)
class SharedDir:
    """A host directory exported to the guest under ``tag`` (virtio-9p with QEMU)."""

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
    tap_name: str = ""


@dataclass(frozen=True)
class VfioDevice:
    """A host PCI device (``host`` is its BDF, e.g. ``0000:3b:00.0``) passed through with VFIO."""

    id: str
    host: str


@dataclass(frozen=True)
class BlockDevice:
    """A raw block device or image file given to the guest.

    ``driver`` is the guest-visible controller: ``virtio-blk``, ``virtio-scsi`` or ``nvme``
    (QEMU's emulated NVMe controller); ``serial`` is what the guest sees as the disk's serial
    (the agent finds the disk by it).
    """

    id: str
    path: str
    readonly: bool = False
    driver: str = "virtio-blk"
    serial: str = ""


Device = NetDevice | VfioDevice | BlockDevice


@dataclass(frozen=True)
class AttachedDevice:
    """A device the guest can now see: ``guest_pci_path`` is kata's PCI path
    (``<bridge slot>/<device slot>`` in hex, e.g. ``02/00``) the agent resolves in sysfs."""

    id: str
    guest_pci_path: str = ""


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to boot one VM. Validated by the driver's ``prepare``.

    ``vm_id`` names the VM (its identity, which a template clone does not share with the
    sandbox that gets it); ``state_dir`` holds the VMM's sockets and logs. Sizes: ``memory_mib``
    is boot RAM; ``max_memory_mib`` > ``memory_mib`` allows memory hotplug. ``max_vcpus`` 0 means
    ``vcpus``. ``vsock_cid``/``vsock_fd`` are the guest CID reserved on /dev/vhost-vsock
    (:func:`hypervisor.host.reserve_vsock_cid`) when ``agent_channel`` is ``vsock``.
    ``options`` is the driver's own options dataclass (``[hypervisor.<name>]`` keys only it
    knows); None means the driver's defaults. ``memory_file`` backs guest RAM with that file
    (a VM template's memory): ``memory_shared`` maps it shared (the template VM writes its RAM
    into the file) or private copy-on-write (a clone: reads share the file's pages, writes are
    the clone's own); "" = anonymous RAM.
    """

    vm_id: str
    state_dir: str
    kernel: str
    hypervisor_path: str
    initrd: str = ""
    image: str = ""
    kernel_params: str = ""
    vcpus: int = 1
    max_vcpus: int = 0
    memory_mib: int = 512
    max_memory_mib: int = 0
    shared_dirs: tuple[SharedDir, ...] = ()
    agent_channel: AgentTransport = "virtio-serial"
    vsock_cid: int = 0
    vsock_fd: int = -1
    vsock_port: int = 1024
    nics: tuple[NetDevice, ...] = ()
    disks: tuple[BlockDevice, ...] = ()
    vfio: tuple[VfioDevice, ...] = ()
    debug: bool = False
    options: Any = None
    memory_file: str = ""
    memory_shared: bool = False


def vm_config_to_dict(cfg: VmConfig) -> dict[str, Any]:
    """JSON-able form of ``cfg`` without open file descriptors (NIC tap fds, the vsock fd): what
    another process needs to drive the same VM (:meth:`Snapshot.adopt`)."""
    data = asdict(replace(cfg, nics=(), vsock_fd=-1, options=None))
    data["options"] = asdict(cfg.options) if cfg.options is not None else None
    return data


def vm_config_from_dict(data: dict[str, Any], options_cls: type | None) -> VmConfig:
    """The inverse of :func:`vm_config_to_dict` (``options_cls`` rebuilds the driver options);
    unknown keys are an error (TypeError/ValueError: the caller reports a bad record)."""
    d = dict(data)
    opts = d.pop("options", None)
    d["shared_dirs"] = tuple(SharedDir(**x) for x in d.get("shared_dirs") or ())
    d["disks"] = tuple(BlockDevice(**x) for x in d.get("disks") or ())
    d["vfio"] = tuple(VfioDevice(**x) for x in d.get("vfio") or ())
    d["nics"] = ()
    options = options_cls(**opts) if opts is not None and options_cls is not None else None
    return VmConfig(**d, options=options)


@dataclass(frozen=True)
class VmPatch:
    """What one sandbox resource adds to the VM before boot (merged in resource order)."""

    shared_dirs: tuple[SharedDir, ...] = ()
    nics: tuple[NetDevice, ...] = ()
    disks: tuple[BlockDevice, ...] = ()
    vfio: tuple[VfioDevice, ...] = ()
    kernel_params: tuple[str, ...] = ()


def apply_patches(cfg: VmConfig, patches: list[VmPatch]) -> VmConfig:
    """``cfg`` with every patch's devices appended and kernel parameters added."""
    params = [cfg.kernel_params] if cfg.kernel_params else []
    out = cfg
    for p in patches:
        out = replace(out, shared_dirs=out.shared_dirs + p.shared_dirs, nics=out.nics + p.nics,
                      disks=out.disks + p.disks, vfio=out.vfio + p.vfio)
        params.extend(p.kernel_params)
    return replace(out, kernel_params=" ".join(params))


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
    """Static facts about a driver with a given config (what the sandbox may plan for)."""

    shared_fs: tuple[str, ...] = ()          # e.g. ("virtio-9p",); () = no shared filesystem
    agent_transports: tuple[str, ...] = ()
    block_drivers: tuple[str, ...] = ()      # cold-plug: virtio-blk, virtio-scsi, nvme
    hotplug: tuple[str, ...] = ()            # device kinds hot-pluggable now: net, block, vfio
    multiqueue_net: bool = False
    memory: tuple[str, ...] = ()             # memory mechanisms: virtio-mem, balloon, dimm
    clone_memory_file: bool = False          # clones restore over a template's memory file


@dataclass(frozen=True)
class BalloonInfo:
    """``actual_bytes``: guest RAM as the balloon driver reports it (boot RAM − inflated).

    ``stats`` are the guest's virtio-balloon statistics (``stat-free-memory``, ...; only the ones
    the guest reported, empty until it did).
    """

    actual_bytes: int
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryInfo:
    """The VM's memory as the VMM sees it, in bytes: ``boot`` + ``plugged`` (virtio-mem/DIMMs)
    is what the guest may use unless the balloon holds ``ballooned`` of it. ``max`` is boot +
    everything that can be plugged; ``block`` the hot(un)plug granularity (0 = no hotplug)."""

    boot: int
    plugged: int = 0
    ballooned: int = 0
    max: int = 0
    block: int = 0

    @property
    def usable(self) -> int:
        return self.boot + self.plugged - self.ballooned


@runtime_checkable
class Hypervisor(Protocol):
    """One VM (the core every driver implements)."""

    name: ClassVar[str]

    async def prepare(self, cfg: VmConfig) -> None:
        """Validate ``cfg`` and create the per-VM state directory; starts nothing."""

    async def start(self, timeout: float) -> None:
        """Launch the VMM and return once its control channel answers and the VM runs."""

    async def stop(self, force: bool = False, timeout: float = 10.0) -> None:
        """Power the VM off (graceful first unless ``force``); returns when the VMM is gone."""

    async def wait(self) -> int:
        """Resolve with the VMM's return code when its process exits (negative = signal)."""

    def agent_address(self) -> AgentAddress: ...

    async def vcpu_threads(self) -> VcpuThreads:
        """{vCPU index: host TID}, each TID verified to be a thread of :meth:`vmm_pid`."""

    def vmm_pid(self) -> int | None: ...

    def capabilities(self) -> Capabilities: ...

    def record(self) -> dict[str, Any]:
        """JSON-able: everything :meth:`recover` needs (valid once ``prepare`` returned)."""

    async def cleanup(self) -> None:
        """Idempotent: kill a leftover VMM and remove every file ``prepare``/``start`` made."""

    @classmethod
    async def recover(cls, record: dict[str, Any], timeout: float = 3.0) -> None:
        """From a fresh process: kill the VMM ``record`` names (only if it is still ours) and
        remove its files. Idempotent; must not raise for things already gone."""


@runtime_checkable
class PauseResume(Protocol):
    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


@runtime_checkable
class DeviceHotplug(Protocol):
    async def add_device(self, dev: Device) -> AttachedDevice:
        """Hot-plug ``dev``; on failure nothing of it stays attached."""

    async def remove_device(self, dev_id: str, timeout: float = 10.0) -> None:
        """Unplug and wait until the guest released it."""


@runtime_checkable
class MemoryControl(Protocol):
    """Guest memory at run time. Mechanisms: ``virtio-mem`` (hotplug both ways), ``dimm``
    (hotplug, grow), ``balloon`` (the guest gives RAM back; absent while it could not return
    anything to the host, e.g. with VFIO attached)."""

    def memory_mechanisms(self) -> tuple[str, ...]: ...

    async def memory_info(self) -> MemoryInfo: ...

    async def resize_memory(self, target_mib: int, timeout: float = 30.0) -> int:
        """Hot(un)plug memory towards ``target_mib`` (boot..max, rounded to the block); returns
        the resulting size in MiB. DeadlineExceeded when the guest did not complete within
        ``timeout`` (the request is withdrawn to what it reached; the VM keeps running)."""

    async def balloon(self, target_bytes: int) -> None:
        """Ask the guest to shrink/grow its usable RAM to ``target_bytes`` (returns at once:
        :meth:`balloon_info` shows how far the guest got)."""

    async def balloon_info(self) -> BalloonInfo: ...


@runtime_checkable
class Snapshot(Protocol):
    """Save a VM and start VMs from what was saved (kata's factory templates).

    With QEMU the VM's RAM is a shared ``memory_file`` (``save`` writes only device state) and a
    clone is ``prepare(cfg)`` with the same ``memory_file`` (``memory_shared=False``) and the
    same devices, then ``restore`` instead of ``start`` (``Capabilities.clone_memory_file``)."""

    async def save(self, directory: str) -> None:
        """Pause and write the VM's device state (and memory, where the VMM owns it) under
        ``directory``; the VM stays paused."""

    async def restore(self, directory: str, timeout: float, resume: bool = True) -> None:
        """Launch the prepared VM from the state ``save`` wrote under ``directory``: running
        when ``resume``, else paused. On failure nothing of it is left running."""


@runtime_checkable
class HandOver(Protocol):
    """Pass a running VM from one process to another (the pre-booted VM cache): the releasing
    side closes its control channel and keeps nothing that would stop the VM; the adopting side
    verifies the record names a live VMM of this driver before it touches it, and from then on
    ``stop``, ``cleanup``, ``wait`` and the capabilities work as for a VM it started (``wait``
    returns 255 when the VMM is not its child: the exit status belongs to the parent)."""

    async def release(self) -> dict[str, Any]:
        """Give up control of the running VM (it keeps running); the record to adopt it by."""

    async def adopt(self, record: dict[str, Any], timeout: float) -> None:
        """Take over the running VM ``record`` (from :meth:`release`) names; instead of
        ``prepare`` + ``start``. HypervisorError when it is not that VM or not running."""


@runtime_checkable
class GuestConsole(Protocol):
    def console_tail(self, limit: int = 4096) -> str:
        """The last ``limit`` bytes of the guest's serial console (for error reports)."""


@runtime_checkable
class VmmMetrics(Protocol):
    async def vmm_counters(self) -> dict[str, float]:
        """Driver-specific counters for ``kata_hypervisor_*`` beyond /proc of the VMM."""
