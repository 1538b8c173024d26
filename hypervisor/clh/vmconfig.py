"""VmConfig → Cloud Hypervisor's command line and its ``VmConfig`` JSON (openapi 0.3.0). Pure:
no I/O. CH-only settings come from ``cfg.options`` (:class:`~hypervisor.clh.options.ClhOptions`).

What goes where, as kata's clh.go does it:

* argv: only ``--api-socket path=<state>/clh-api.sock`` (+ ``-v`` with debug, ``--seccomp false``
  when asked); everything else is API.
* ``vm.create``: cpus (boot/max, kata's topology), memory (+ ``hotplug_size`` and the hotplug
  method), payload (kernel, cmdline, initramfs), the image as a read-only first disk (/dev/vda),
  data disks, VFIO devices, rng, balloon, serial to ``console.log``, the hybrid vsock on
  ``<state>/clh.sock``.
* NICs are not in ``vm.create``: they follow with ``vm.add-net`` carrying the tap fds
  (:func:`net_config`), before ``vm.boot``.

Cloud Hypervisor has no 9p (``shared_dirs`` is refused), serves only the ``hybrid-vsock`` agent
channel and only ``virtio-blk`` disks. Bad values raise InvalidArgument.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from common.errors import HypervisorError, InvalidArgument
from common.ids import valid_id
from hypervisor.base import BlockDevice, NetDevice, VfioDevice, VmConfig
from hypervisor.clh.options import ClhOptions

BASE_KERNEL_PARAMS = ("console=ttyS0", "panic=1", "no_timer_check", "noreplace-smp")  # kata's clhKernelParams
MIN_MEMORY_MIB = 64
MAX_VCPUS = 254
ACPI_BLOCK_MIB = 128       # ACPI hotplug and the virtio-mem region grow in 128 MiB blocks
VIRTIO_MEM_BLOCK_MIB = 2   # virtio-mem plugs 2 MiB blocks
GUEST_CID = 3              # kata's defaultGuestVSockCID: hybrid vsock never reaches the host kernel
DISK_QUEUE_SIZE = 1024     # kata's hot-plugged virtio-blk queue size
NET_QUEUE_SIZE = 256
BLOCK_DRIVERS = ("virtio-blk",)
ROOTFS_DISK_ID = "rootfs"

_DEV_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")
_SERIAL = re.compile(r"[A-Za-z0-9_.-]{1,20}")
_BDF = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_KERNEL_PARAMS = re.compile(r"[A-Za-z0-9_.,:=/+\- ]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_GUEST_BDF = re.compile(r"0000:00:([0-9a-fA-F]{2})\.0")
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


@dataclass(frozen=True)
class ClhPaths:
    """The files a VM keeps under its state dir (kata's socket names)."""

    state_dir: str

    @property
    def api_socket(self) -> str:
        return os.path.join(self.state_dir, "clh-api.sock")

    @property
    def vsock_socket(self) -> str:
        return os.path.join(self.state_dir, "clh.sock")

    @property
    def console_log(self) -> str:
        return os.path.join(self.state_dir, "console.log")

    @property
    def vmm_log(self) -> str:
        return os.path.join(self.state_dir, "clh.log")

    @property
    def pidfile(self) -> str:
        """Written by the driver right after the VMM started (CH has no pidfile option)."""
        return os.path.join(self.state_dir, "clh.pid")

    @property
    def marker(self) -> str:
        """Present when the driver created state_dir (so it may remove the whole directory)."""
        return os.path.join(self.state_dir, ".kata-colo-vm")

    @property
    def api_socket_arg(self) -> str:
        """The ``--api-socket`` value; also what :func:`is_our_vmm` looks for in a cmdline."""
        return f"path={self.api_socket}"

    def files(self) -> tuple[str, ...]:
        return (self.api_socket, self.vsock_socket, self.console_log, self.vmm_log, self.pidfile,
                self.marker)


def options_of(cfg: VmConfig) -> ClhOptions:
    """The CH options of ``cfg`` (defaults when the sandbox gave none)."""
    opts = cfg.options if cfg.options is not None else ClhOptions()
    if not isinstance(opts, ClhOptions):
        raise InvalidArgument(f"Cloud Hypervisor got options of another driver ({type(opts).__name__})")
    return opts


def max_vcpus(cfg: VmConfig) -> int:
    return cfg.max_vcpus or cfg.vcpus


def hotplug_mib(cfg: VmConfig) -> int:
    """Hot-pluggable memory beyond boot RAM (whole 128 MiB blocks; 0 = no memory hotplug)."""
    extra = max(0, cfg.max_memory_mib - cfg.memory_mib)
    return extra - extra % ACPI_BLOCK_MIB


def kernel_cmdline(cfg: VmConfig) -> str:
    params = list(BASE_KERNEL_PARAMS)
    if not cfg.debug:
        params.append("quiet")
    if cfg.image:
        params += ["root=/dev/vda", "ro"]
    if cfg.initrd:
        params.append("rdinit=/init")
    extra = cfg.kernel_params.strip()
    if extra:
        if not _KERNEL_PARAMS.fullmatch(extra):
            raise InvalidArgument(f"kernel_params has unsupported characters: {extra!r}")
        params.append(extra)
    return " ".join(params)


def validate(cfg: VmConfig) -> None:
    """Raise InvalidArgument for anything Cloud Hypervisor would refuse or this driver cannot do."""
    options_of(cfg).validate()
    if not valid_id(cfg.vm_id):
        raise InvalidArgument(f"bad VM id {cfg.vm_id!r}")
    if not cfg.state_dir or not os.path.isabs(cfg.state_dir):
        raise InvalidArgument(f"state_dir must be an absolute path, not {cfg.state_dir!r}")
    paths = ClhPaths(cfg.state_dir)
    # the longest socket: CH's guest-initiated hybrid vsock connections land on <clh.sock>_<port>
    if len(os.fsencode(f"{paths.vsock_socket}_{0xFFFFFFFF}")) > _UNIX_PATH_MAX:
        raise InvalidArgument(f"state_dir too long for unix sockets: {cfg.state_dir!r}")
    if not cfg.kernel:
        raise InvalidArgument("no guest kernel configured")
    if not cfg.hypervisor_path:
        raise InvalidArgument("no Cloud Hypervisor binary configured")
    for what, path in (("state_dir", cfg.state_dir), ("kernel", cfg.kernel), ("initrd", cfg.initrd),
                       ("image", cfg.image), ("hypervisor_path", cfg.hypervisor_path)):
        if path and (_CONTROL.search(path) or not os.path.isabs(path)):
            raise InvalidArgument(f"{what} must be an absolute path without control characters: {path!r}")
    if not 1 <= cfg.vcpus <= MAX_VCPUS:
        raise InvalidArgument(f"vcpus must be 1..{MAX_VCPUS}, not {cfg.vcpus}")
    if not cfg.vcpus <= max_vcpus(cfg) <= MAX_VCPUS:
        raise InvalidArgument(f"max_vcpus must be {cfg.vcpus}..{MAX_VCPUS} (or 0), not {cfg.max_vcpus}")
    if cfg.memory_mib < MIN_MEMORY_MIB:
        raise InvalidArgument(f"memory_mib must be >= {MIN_MEMORY_MIB}, not {cfg.memory_mib}")
    if cfg.max_memory_mib and cfg.max_memory_mib < cfg.memory_mib:
        raise InvalidArgument(f"max_memory_mib ({cfg.max_memory_mib}) < memory_mib ({cfg.memory_mib})")
    if cfg.shared_dirs:
        raise InvalidArgument("Cloud Hypervisor has no virtio-9p: shared directories "
                              f"{[d.tag for d in cfg.shared_dirs]} cannot be exported (use a block rootfs)")
    if cfg.agent_channel != "hybrid-vsock":
        raise InvalidArgument(f"Cloud Hypervisor serves the agent over hybrid-vsock only, not {cfg.agent_channel!r}")
    if not 1 <= cfg.vsock_port <= 0xFFFFFFFF:
        raise InvalidArgument(f"bad vsock port {cfg.vsock_port}")
    devices: list[NetDevice | BlockDevice | VfioDevice] = [*cfg.nics, *cfg.disks, *cfg.vfio]
    ids = [d.id for d in devices] + ([ROOTFS_DISK_ID] if cfg.image else [])
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"duplicate device ids: {ids}")
    for nic in cfg.nics:
        validate_nic(nic, cfg.vcpus)
    for disk in cfg.disks:
        validate_disk(disk)
    for dev in cfg.vfio:
        validate_vfio(dev)
    kernel_cmdline(cfg)


def check_device_id(dev_id: str) -> str:
    if not _DEV_ID.fullmatch(dev_id):
        raise InvalidArgument(f"bad device id {dev_id!r} (letter, then up to 30 of [A-Za-z0-9_-])")
    return dev_id


def validate_nic(nic: NetDevice, vcpus: int) -> None:
    check_device_id(nic.id)
    if not _MAC.fullmatch(nic.mac):
        raise InvalidArgument(f"NIC {nic.id}: bad MAC {nic.mac!r}")
    if not nic.tap_fds or any(fd <= 2 for fd in nic.tap_fds):
        raise InvalidArgument(f"NIC {nic.id}: needs open tap fds above 2, got {nic.tap_fds}")
    if len(nic.tap_fds) > vcpus:  # CH: queue pairs may not exceed boot vCPUs
        raise InvalidArgument(f"NIC {nic.id}: {len(nic.tap_fds)} queue pairs exceed the {vcpus} vCPUs")


def validate_disk(disk: BlockDevice) -> None:
    check_device_id(disk.id)
    if disk.driver not in BLOCK_DRIVERS:
        raise InvalidArgument(f"disk {disk.id}: Cloud Hypervisor supports only {BLOCK_DRIVERS}, not {disk.driver!r}")
    if not os.path.isabs(disk.path) or _CONTROL.search(disk.path):
        raise InvalidArgument(f"disk {disk.id}: path must be absolute without control characters")
    if disk.serial and not _SERIAL.fullmatch(disk.serial):
        raise InvalidArgument(f"disk {disk.id}: bad serial {disk.serial!r}")


def validate_vfio(dev: VfioDevice) -> None:
    check_device_id(dev.id)
    if not _BDF.fullmatch(dev.host):
        raise InvalidArgument(f"VFIO device {dev.id}: bad PCI address {dev.host!r}")


def build_argv(cfg: VmConfig) -> list[str]:
    """The complete argv (argv[0] = the cloud-hypervisor binary)."""
    validate(cfg)
    argv = [cfg.hypervisor_path, "--api-socket", ClhPaths(cfg.state_dir).api_socket_arg]
    if cfg.debug:
        argv.append("-v")
    if options_of(cfg).disable_seccomp:
        argv += ["--seccomp", "false"]
    return argv


def disk_config(disk: BlockDevice, queues: int) -> dict[str, Any]:
    validate_disk(disk)
    out: dict[str, Any] = {"path": disk.path, "readonly": disk.readonly, "id": disk.id,
                           "num_queues": max(1, queues), "queue_size": DISK_QUEUE_SIZE}
    if disk.serial:
        out["serial"] = disk.serial
    return out


def net_config(nic: NetDevice, vcpus: int) -> dict[str, Any]:
    """The ``vm.add-net`` body; the tap fds go out of band (SCM_RIGHTS), one queue pair each."""
    validate_nic(nic, vcpus)
    return {"id": nic.id, "mac": nic.mac, "num_queues": 2 * len(nic.tap_fds), "queue_size": NET_QUEUE_SIZE}


def device_config(dev: VfioDevice) -> dict[str, Any]:
    validate_vfio(dev)
    return {"id": dev.id, "path": f"/sys/bus/pci/devices/{dev.host.lower()}/"}


def build_vm_config(cfg: VmConfig) -> dict[str, Any]:
    """The ``vm.create`` body."""
    validate(cfg)
    opts = options_of(cfg)
    paths = ClhPaths(cfg.state_dir)
    top = max_vcpus(cfg)
    memory: dict[str, Any] = {"size": cfg.memory_mib << 20, "shared": False,
                              "hotplug_method": opts.ch_hotplug_method}
    if hotplug_mib(cfg):
        memory["hotplug_size"] = hotplug_mib(cfg) << 20
    payload = {"kernel": cfg.kernel, "cmdline": kernel_cmdline(cfg)}
    if cfg.initrd:
        payload["initramfs"] = cfg.initrd
    vm: dict[str, Any] = {
        "cpus": {"boot_vcpus": cfg.vcpus, "max_vcpus": top,
                 "topology": {"threads_per_core": 1, "cores_per_die": top, "dies_per_package": 1,
                              "packages": 1}},
        "memory": memory,
        "payload": payload,
        "rng": {"src": opts.entropy_source},
        "serial": {"mode": "File", "file": paths.console_log},
        "console": {"mode": "Off"},
        "vsock": {"cid": GUEST_CID, "socket": paths.vsock_socket},
    }
    disks = [disk_config(d, cfg.vcpus) for d in cfg.disks]
    if cfg.image:
        disks.insert(0, {"path": cfg.image, "readonly": True, "id": ROOTFS_DISK_ID})
    if disks:
        vm["disks"] = disks
    if cfg.vfio:
        vm["devices"] = [device_config(d) for d in cfg.vfio]
    if opts.enable_balloon:
        vm["balloon"] = {"size": 0, "deflate_on_oom": True,
                         "free_page_reporting": opts.reclaim_guest_freed_memory}
    return vm


def guest_pci_path(bdf: str) -> str:
    """kata's PCI path of a device CH reports at ``bdf``: CH uses no bridges, so a device is
    ``0000:00:<slot>.0`` and its path is the slot (HypervisorError otherwise, as in kata)."""
    m = _GUEST_BDF.fullmatch(bdf)
    if m is None:
        raise HypervisorError(f"unexpected PCI address {bdf!r} from cloud-hypervisor hotplug")
    return m.group(1).lower()
