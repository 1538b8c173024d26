"""VmConfig → QEMU argv. Pure: no I/O; the caller passes the accelerator it resolved on this host
(:func:`hypervisor.host.resolve_accel`). QEMU-only settings come from ``cfg.options``
(:class:`~hypervisor.qemu.options.QemuOptions`).

Every value that lands inside a QemuOpts list (``key=value,key=value``) goes through
:func:`opt_value`, which doubles commas (QEMU's escape) and rejects control characters; ids,
tags and MACs are validated against strict patterns instead. Bad values raise InvalidArgument.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from common.errors import InvalidArgument
from common.guest_paths import AGENT_PORT_NAME
from common.ids import valid_id
from hypervisor.base import BlockDevice, NetDevice, SharedDir, VfioDevice, VmConfig
from hypervisor.qemu.options import MACHINES, QemuOptions

BASE_KERNEL_PARAMS = ("console=ttyS0", "panic=-1")
MIN_MEMORY_MIB = 64
MAX_VCPUS = 255
RESOLVED_ACCELS = ("kvm", "tcg")
BLOCK_DRIVERS = ("virtio-blk", "virtio-scsi", "nvme")
MEMORY_BACKEND_ID = "ram0"
VIRTIO_MEM_ID = "vmem0"
SCSI_CONTROLLER = "scsi0"
#: Cold-plugged VFIO devices each get their own root port, after the hot-plug ones (kata's
#: ``cold_plug_vfio = "root-port"``); chassis numbers continue from theirs.
VFIO_PORT_PREFIX = "rpv"

_DEV_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,31}")
_SERIAL = re.compile(r"[A-Za-z0-9_.-]{1,20}")
_BDF = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_CPU_MODEL = re.compile(r"[A-Za-z0-9_.+=,-]{1,128}")
_KERNEL_PARAMS = re.compile(r"[A-Za-z0-9_.,:=/+\- ]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# sun_path is 108 bytes including the terminating NUL.
_UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class VmPaths:
    """The files a VM keeps under its state dir."""

    state_dir: str

    @property
    def qmp_socket(self) -> str:
        return os.path.join(self.state_dir, "qmp.sock")

    @property
    def agent_socket(self) -> str:
        return os.path.join(self.state_dir, "agent.sock")

    @property
    def console_log(self) -> str:
        return os.path.join(self.state_dir, "console.log")

    @property
    def qemu_log(self) -> str:
        return os.path.join(self.state_dir, "qemu.log")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.state_dir, "qemu.pid")

    @property
    def marker(self) -> str:
        """Present when the driver created state_dir (so it may remove the whole directory)."""
        return os.path.join(self.state_dir, ".kata-colo-vm")

    def files(self) -> tuple[str, ...]:
        return (self.qmp_socket, self.agent_socket, self.console_log, self.qemu_log, self.pidfile)


def opt_value(value: str, what: str) -> str:
    """Escape ``value`` for a QemuOpts list: commas are doubled; control characters rejected."""
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if _CONTROL.search(value):
        raise InvalidArgument(f"{what} contains control characters: {value!r}")
    return value.replace(",", ",,")


def options_of(cfg: VmConfig) -> QemuOptions:
    """The QEMU options of ``cfg`` (defaults when the sandbox gave none)."""
    opts = cfg.options if cfg.options is not None else QemuOptions()
    if not isinstance(opts, QemuOptions):
        raise InvalidArgument(f"QEMU got options of another driver ({type(opts).__name__})")
    return opts


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
    """Raise InvalidArgument for any value QEMU would reject or that would be unsafe."""
    opts = options_of(cfg).validate()
    if not valid_id(cfg.vm_id):
        raise InvalidArgument(f"bad VM id {cfg.vm_id!r}")
    if not cfg.state_dir or not os.path.isabs(cfg.state_dir):
        raise InvalidArgument(f"state_dir must be an absolute path, not {cfg.state_dir!r}")
    paths = VmPaths(cfg.state_dir)
    if len(os.fsencode(paths.agent_socket)) > _UNIX_PATH_MAX:
        raise InvalidArgument(f"state_dir too long for unix sockets: {cfg.state_dir!r}")
    if not cfg.kernel:
        raise InvalidArgument("no guest kernel configured")
    if not cfg.hypervisor_path:
        raise InvalidArgument("no hypervisor binary configured")
    for what, path in (("state_dir", cfg.state_dir), ("kernel", cfg.kernel),
                       ("initrd", cfg.initrd), ("image", cfg.image),
                       ("hypervisor_path", cfg.hypervisor_path)):
        if path and _CONTROL.search(path):
            raise InvalidArgument(f"{what} contains control characters: {path!r}")
    if opts.machine_type not in MACHINES:
        raise InvalidArgument(f"machine must be one of {MACHINES}, not {opts.machine_type!r}")
    if opts.cpu_model and not _CPU_MODEL.fullmatch(opts.cpu_model):
        raise InvalidArgument(f"bad cpu model {opts.cpu_model!r}")
    if not 1 <= cfg.vcpus <= MAX_VCPUS:
        raise InvalidArgument(f"vcpus must be 1..{MAX_VCPUS}, not {cfg.vcpus}")
    if cfg.max_vcpus and not cfg.vcpus <= cfg.max_vcpus <= MAX_VCPUS:
        raise InvalidArgument(f"max_vcpus must be {cfg.vcpus}..{MAX_VCPUS} (or 0), not {cfg.max_vcpus}")
    if cfg.memory_mib < MIN_MEMORY_MIB:
        raise InvalidArgument(f"memory_mib must be >= {MIN_MEMORY_MIB}, not {cfg.memory_mib}")
    if cfg.max_memory_mib and cfg.max_memory_mib < cfg.memory_mib:
        raise InvalidArgument(f"max_memory_mib ({cfg.max_memory_mib}) < memory_mib ({cfg.memory_mib})")
    if not 0 <= opts.memory_slots <= 255:
        raise InvalidArgument(f"memory_slots must be 0..255, not {opts.memory_slots}")
    if cfg.max_memory_mib > cfg.memory_mib and opts.memory_slots == 0 and not opts.enable_virtio_mem:
        raise InvalidArgument("memory hotplug (max_memory_mib > memory_mib) needs memory_slots > 0 "
                              "or enable_virtio_mem")
    if opts.enable_virtio_mem and 0 < cfg.max_memory_mib - cfg.memory_mib < opts.virtio_mem_block_mib:
        raise InvalidArgument(f"virtio-mem: max_memory_mib − memory_mib must be at least one "
                              f"{opts.virtio_mem_block_mib} MiB block")
    if cfg.vfio and opts.machine_type != "q35":
        raise InvalidArgument("VFIO devices need machine q35 (pcie-root-port)")
    if opts.pcie_root_ports + len(cfg.vfio) > 32:
        raise InvalidArgument(f"{len(cfg.vfio)} VFIO devices + {opts.pcie_root_ports} root ports: more than 32")
    if not 0 <= opts.pcie_root_ports <= 32:
        raise InvalidArgument(f"pcie_root_ports must be 0..32, not {opts.pcie_root_ports}")
    if opts.pcie_root_ports and opts.machine_type != "q35":
        raise InvalidArgument("pcie root ports need machine q35")
    if cfg.memory_file:
        if not os.path.isabs(cfg.memory_file):
            raise InvalidArgument(f"memory_file must be an absolute path, not {cfg.memory_file!r}")
        if not cfg.memory_shared and opts.enable_balloon and opts.reclaim_guest_freed_memory:
            # QEMU 7.2 discards a freed page of a private file mapping by punching a hole in the
            # FILE (ram_block_discard_range): every other clone of the template would read zeros
            raise InvalidArgument("free page reporting (reclaim_guest_freed_memory) cannot run on a "
                                  "copy-on-write memory file: QEMU would punch holes in the template")
    if cfg.agent_channel == "vsock":
        if not 3 <= cfg.vsock_cid < 0xFFFFFFFF:
            raise InvalidArgument(f"vsock guest cid must be >= 3, not {cfg.vsock_cid}")
    elif cfg.agent_channel != "virtio-serial":
        raise InvalidArgument(f"QEMU cannot serve agent channel {cfg.agent_channel!r}")
    if not 1 <= cfg.vsock_port <= 0xFFFFFFFF:
        raise InvalidArgument(f"bad vsock port {cfg.vsock_port}")
    tags = [d.tag for d in cfg.shared_dirs]
    if len(set(tags)) != len(tags):
        raise InvalidArgument(f"duplicate 9p mount tags: {tags}")
    for share in cfg.shared_dirs:
        if not _TAG.fullmatch(share.tag):
            raise InvalidArgument(f"bad 9p mount tag {share.tag!r} (1-31 of [A-Za-z0-9_.-])")
        if not os.path.isabs(share.host_path):
            raise InvalidArgument(f"9p share {share.tag}: host path must be absolute")
    devices: list[NetDevice | BlockDevice | VfioDevice] = [*cfg.nics, *cfg.disks, *cfg.vfio]
    ids = [d.id for d in devices]
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"duplicate device ids: {ids}")
    for nic in cfg.nics:
        validate_nic(nic)
    for disk in cfg.disks:
        validate_disk(disk)
    for dev in cfg.vfio:
        validate_vfio(dev)
    kernel_cmdline(cfg)


def validate_nic(nic: NetDevice) -> None:
    check_device_id(nic.id)
    if not _MAC.fullmatch(nic.mac):
        raise InvalidArgument(f"NIC {nic.id}: bad MAC {nic.mac!r}")
    if not nic.tap_fds or any(fd < 0 for fd in nic.tap_fds):
        raise InvalidArgument(f"NIC {nic.id}: needs open tap fds, got {nic.tap_fds}")


def validate_disk(disk: BlockDevice) -> None:
    check_device_id(disk.id)
    if disk.driver not in BLOCK_DRIVERS:
        raise InvalidArgument(f"disk {disk.id}: driver must be one of {BLOCK_DRIVERS}, not {disk.driver!r}")
    if not os.path.isabs(disk.path):
        raise InvalidArgument(f"disk {disk.id}: path must be absolute")
    if disk.serial and not _SERIAL.fullmatch(disk.serial):
        raise InvalidArgument(f"disk {disk.id}: bad serial {disk.serial!r}")


def validate_vfio(dev: VfioDevice) -> None:
    check_device_id(dev.id)
    if not _BDF.fullmatch(dev.host):
        raise InvalidArgument(f"VFIO device {dev.id}: bad PCI address {dev.host!r}")


def check_device_id(dev_id: str) -> str:
    if not _DEV_ID.fullmatch(dev_id):
        raise InvalidArgument(f"bad device id {dev_id!r} (letter, then up to 30 of [A-Za-z0-9_-])")
    return dev_id


def build_argv(cfg: VmConfig, accel: str, *, incoming: bool = False) -> list[str]:
    """The complete argv (argv[0] = the QEMU binary). ``accel`` is ``kvm`` or ``tcg`` (resolved).
    ``incoming``: wait for the device state of a saved VM (``migrate-incoming``) instead of
    booting."""
    validate(cfg)
    if accel not in RESOLVED_ACCELS:
        raise InvalidArgument(f"accelerator must be resolved to one of {RESOLVED_ACCELS}, not {accel!r}")
    opts = options_of(cfg)
    paths = VmPaths(cfg.state_dir)
    argv = [cfg.hypervisor_path,
            "-name", f"{cfg.vm_id},debug-threads=on",
            "-no-user-config", "-nodefaults", "-nographic", "-no-reboot",
            "-machine", opts.machine_type + (f",memory-backend={MEMORY_BACKEND_ID}" if cfg.memory_file else "")]
    tcg = "tcg,thread=multi" + (f",tb-size={opts.tcg_tb_size}" if opts.tcg_tb_size else "")
    argv += ["-accel", tcg] if accel == "tcg" else ["-accel", "kvm"]
    argv += ["-cpu", opts.cpu_model or ("max" if accel == "tcg" else "host")]
    max_vcpus = cfg.max_vcpus or cfg.vcpus
    argv += ["-smp", f"{cfg.vcpus},maxcpus={max_vcpus}"]
    if virtio_mem_mib(cfg):
        argv += ["-m", f"{cfg.memory_mib}M,maxmem={cfg.max_memory_mib}M"]
    elif cfg.max_memory_mib > cfg.memory_mib:
        argv += ["-m", f"{cfg.memory_mib}M,slots={opts.memory_slots},maxmem={cfg.max_memory_mib}M"]
    else:
        argv += ["-m", f"{cfg.memory_mib}M"]
    if cfg.memory_file:
        argv += memory_file_args(cfg)
    argv += ["-kernel", cfg.kernel]
    if cfg.initrd:
        argv += ["-initrd", cfg.initrd]
    argv += ["-append", kernel_cmdline(cfg)]
    argv += ["-pidfile", paths.pidfile]
    argv += ["-chardev", f"socket,id=charqmp0,path={opt_value(paths.qmp_socket, 'QMP socket')},"
                         "server=on,wait=off",
             "-mon", "chardev=charqmp0,mode=control"]
    argv += ["-chardev", f"file,id=charconsole0,path={opt_value(paths.console_log, 'console log')}",
             "-serial", "chardev:charconsole0"]
    for i in range(opts.pcie_root_ports):
        argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},slot=0"]
    if cfg.agent_channel == "vsock":
        vsock = f"vhost-vsock-pci,id=vsock0,guest-cid={cfg.vsock_cid}"
        if cfg.vsock_fd >= 0:
            vsock += f",vhostfd={cfg.vsock_fd}"
        argv += ["-device", vsock]
    else:
        argv += ["-device", "virtio-serial-pci,id=vserial0",
                 "-chardev", f"socket,id=charagent0,path={opt_value(paths.agent_socket, 'agent socket')},"
                             "server=on,wait=off",
                 "-device", f"virtserialport,chardev=charagent0,id=agentport0,name={AGENT_PORT_NAME}"]
    for i, share in enumerate(cfg.shared_dirs):
        argv += share_args(i, share, opts.ninep_security_model)
    argv += virtio_mem_args(cfg)
    if cfg.image:
        argv += ["-drive", f"if=none,id=rootfs0,file={opt_value(cfg.image, 'image')},"
                           "format=raw,readonly=on",
                 "-device", "virtio-blk-pci,id=rootdisk0,drive=rootfs0"]
    if needs_scsi_controller(cfg):
        argv += ["-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER}"]
    for disk in cfg.disks:
        argv += disk_args(disk)
    for i, nic in enumerate(cfg.nics):
        argv += nic_args(i, nic)
    for i, dev in enumerate(cfg.vfio):
        argv += vfio_args(i, dev, opts.pcie_root_ports)
    if opts.enable_balloon:
        reporting = ",free-page-reporting=on" if opts.reclaim_guest_freed_memory else ""
        argv += ["-device", f"virtio-balloon-pci,id=balloon0,deflate-on-oom=on{reporting}"]
    if cfg.memory_file:
        # a new generation id per VM process: a restored clone's kernel reseeds its RNG on it
        argv += ["-device", "vmgenid,id=vmgenid0,guid=auto"]
    if cfg.debug:
        argv += ["-msg", "timestamp=on"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def memory_file_args(cfg: VmConfig) -> list[str]:
    """Guest RAM in ``cfg.memory_file`` (the machine's memory backend): shared = the file holds
    the RAM (a template), private = copy-on-write over it (a clone)."""
    share = "on" if cfg.memory_shared else "off"
    return ["-object", f"memory-backend-file,id={MEMORY_BACKEND_ID},size={cfg.memory_mib}M,"
                       f"mem-path={opt_value(cfg.memory_file, 'memory file')},share={share}"]


def virtio_mem_mib(cfg: VmConfig) -> int:
    """Size of the virtio-mem device (the hot-pluggable memory in whole blocks; 0 = none)."""
    opts = options_of(cfg)
    if not opts.enable_virtio_mem or cfg.max_memory_mib <= cfg.memory_mib:
        return 0
    extra = cfg.max_memory_mib - cfg.memory_mib
    return extra - extra % opts.virtio_mem_block_mib


def virtio_mem_args(cfg: VmConfig) -> list[str]:
    """The virtio-mem device (``VIRTIO_MEM_ID``) over a RAM backend reserving no host memory
    (``reserve=off``: only blocks the guest plugged and touched cost host RAM); it starts with
    nothing plugged (``requested-size=0``)."""
    size = virtio_mem_mib(cfg)
    if not size:
        return []
    block = options_of(cfg).virtio_mem_block_mib
    return ["-object", f"memory-backend-ram,id={VIRTIO_MEM_ID}-ram,size={size}M,reserve=off",
            "-device", f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_ID}-ram,"
                       f"block-size={block}M,requested-size=0"]


def needs_scsi_controller(cfg: VmConfig) -> bool:
    """A virtio-scsi controller exists when a cold-plugged disk uses it or the rootfs disks of
    later containers will be hot-plugged as SCSI LUNs (``block_device_driver``)."""
    return (options_of(cfg).block_device_driver == "virtio-scsi"
            or any(d.driver == "virtio-scsi" for d in cfg.disks))


def vfio_args(index: int, dev: VfioDevice, hotplug_ports: int) -> list[str]:
    """A cold-plugged VFIO function behind its own pcie-root-port."""
    validate_vfio(dev)
    port = f"{VFIO_PORT_PREFIX}{index}"
    return ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={hotplug_ports + index + 1},slot=0",
            "-device", f"vfio-pci,id={dev.id},host={dev.host},bus={port}"]


def disk_args(disk: BlockDevice) -> list[str]:
    """A cold-plugged disk: a raw blockdev node plus the guest controller device."""
    validate_disk(disk)
    node = f"{disk.id}-blk"
    ro = "on" if disk.readonly else "off"
    drive = (f"driver=raw,node-name={node},read-only={ro},file.driver=file,"
             f"file.filename={opt_value(disk.path, f'disk {disk.id}')},file.read-only={ro}")
    serial = f",serial={disk.serial}" if disk.serial else ""
    if disk.driver == "nvme":
        device = f"nvme,id={disk.id},drive={node}{serial or f',serial={disk.id}'}"
    elif disk.driver == "virtio-scsi":
        device = f"scsi-hd,id={disk.id},drive={node},bus={SCSI_CONTROLLER}.0{serial}"
    else:
        device = f"virtio-blk-pci,id={disk.id},drive={node}{serial}"
    return ["-blockdev", drive, "-device", device]


def share_args(index: int, share: SharedDir, security_model: str = "none") -> list[str]:
    fsdev = (f"local,id=fsdev{index},path={opt_value(share.host_path, f'9p share {share.tag}')},"
             f"security_model={security_model},multidevs=remap")
    if share.readonly:
        fsdev += ",readonly=on"
    return ["-fsdev", fsdev,
            "-device", f"virtio-9p-pci,id=fs{index},fsdev=fsdev{index},mount_tag={share.tag}"]


def nic_args(index: int, nic: NetDevice) -> list[str]:
    validate_nic(nic)
    vhost = "on" if nic.vhost else "off"
    if len(nic.tap_fds) == 1:
        netdev = f"tap,id=net{index},fd={nic.tap_fds[0]},vhost={vhost}"
        device = f"virtio-net-pci,id={nic.id},netdev=net{index},mac={nic.mac}"
    else:
        fds = ":".join(str(fd) for fd in nic.tap_fds)
        netdev = f"tap,id=net{index},fds={fds},vhost={vhost}"
        device = (f"virtio-net-pci,id={nic.id},netdev=net{index},mac={nic.mac},"
                  f"mq=on,vectors={2 * len(nic.tap_fds) + 2}")
    return ["-netdev", netdev, "-device", device]
