import pytest

from common.errors import InvalidArgument
from hypervisor.base import BlockDevice, NetDevice, SharedDir, VfioDevice, VmConfig
from hypervisor.qemu import cmdline
from hypervisor.qemu.options import QemuOptions

_OPTION_KEYS = {"accel": "accel", "machine": "machine_type", "cpu_model": "cpu_model",
                "memory_slots": "memory_slots", "balloon": "enable_balloon",
                "pcie_root_ports": "pcie_root_ports", "security_model": "ninep_security_model"}


def cfg(**kw) -> VmConfig:
    """A VmConfig; QEMU-only keys (accel, machine, ...) go into its QemuOptions."""
    opts = {_OPTION_KEYS[k]: kw.pop(k) for k in list(kw) if k in _OPTION_KEYS}
    base = dict(vm_id="sb1", state_dir="/run/kata-colo/sbs/sb1/vm", kernel="/img/vmlinux",
                initrd="/img/initramfs.cpio", hypervisor_path="/usr/bin/qemu-system-x86_64")
    base.update(kw)
    return VmConfig(**base, options=QemuOptions(**opts))


def build(c: VmConfig, accel: str = "tcg") -> list[str]:
    return cmdline.build_argv(c, accel)


def opt(argv: list[str], flag: str) -> list[str]:
    """All values following ``flag`` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_resolved_accel_picks_accel_and_cpu(accel):
    argv = build(cfg(), accel)
    if accel == "kvm":
        assert opt(argv, "-accel") == ["kvm"]
        assert opt(argv, "-cpu") == ["host"]
    else:
        assert opt(argv, "-accel") == ["tcg,thread=multi"]
        assert opt(argv, "-cpu") == ["max"]
    assert not any("thread=" in m for m in opt(argv, "-machine"))


def test_unresolved_accel_is_refused():
    with pytest.raises(InvalidArgument, match="resolved"):
        build(cfg(), "auto")


def test_cpu_model_option_wins():
    assert opt(build(cfg(cpu_model="qemu64")), "-cpu") == ["qemu64"]


def test_smp_and_memory_without_hotplug():
    argv = build(cfg(vcpus=2, memory_mib=512))
    assert opt(argv, "-smp") == ["2,maxcpus=2"]
    assert opt(argv, "-m") == ["512M"]
    argv = build(cfg(vcpus=2, max_vcpus=4))
    assert opt(argv, "-smp") == ["2,maxcpus=4"]


def test_memory_hotplug_args():
    argv = build(cfg(memory_mib=1024, max_memory_mib=4096, memory_slots=3))
    assert opt(argv, "-m") == ["1024M,slots=3,maxmem=4096M"]


def test_base_devices_sockets_and_logs_live_under_state_dir():
    c = cfg()
    argv = build(c)
    sd = c.state_dir
    assert argv[0] == c.hypervisor_path
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert opt(argv, "-name") == ["sb1,debug-threads=on"]
    assert opt(argv, "-machine") == ["q35"]
    assert opt(argv, "-pidfile") == [f"{sd}/qemu.pid"]
    chardevs = opt(argv, "-chardev")
    assert f"socket,id=charqmp0,path={sd}/qmp.sock,server=on,wait=off" in chardevs
    assert f"file,id=charconsole0,path={sd}/console.log" in chardevs
    assert opt(argv, "-mon") == ["chardev=charqmp0,mode=control"]
    assert opt(argv, "-serial") == ["chardev:charconsole0"]
    assert f"socket,id=charagent0,path={sd}/agent.sock,server=on,wait=off" in chardevs
    devices = opt(argv, "-device")
    assert "virtio-serial-pci,id=vserial0" in devices
    assert "virtserialport,chardev=charagent0,id=agentport0,name=agent.channel.0" in devices
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on" in devices
    assert not any(d.startswith("vhost-vsock") for d in devices)
    assert opt(argv, "-kernel") == ["/img/vmlinux"]
    assert opt(argv, "-initrd") == ["/img/initramfs.cpio"]
    assert opt(argv, "-append") == ["console=ttyS0 panic=-1 quiet rdinit=/init"]


def test_kernel_params_image_and_debug():
    argv = build(cfg(initrd="", image="/img/root.img", debug=True, kernel_params="kata_colo.init=poweroff"))
    assert opt(argv, "-append") == ["console=ttyS0 panic=-1 root=/dev/vda ro kata_colo.init=poweroff"]
    assert "-initrd" not in argv
    assert "if=none,id=rootfs0,file=/img/root.img,format=raw,readonly=on" in opt(argv, "-drive")
    assert "virtio-blk-pci,id=rootdisk0,drive=rootfs0" in opt(argv, "-device")


def test_vsock_replaces_virtio_serial():
    argv = build(cfg(agent_channel="vsock", vsock_cid=7))
    devices = opt(argv, "-device")
    assert "vhost-vsock-pci,id=vsock0,guest-cid=7" in devices
    assert not any(d.startswith(("virtio-serial-pci", "virtserialport")) for d in devices)
    assert not any("charagent0" in c for c in opt(argv, "-chardev"))


def test_9p_shares_with_comma_escaping_and_readonly():
    shares = (SharedDir("kataShared", "/run/kata-colo/shared/sb1"),
              SharedDir("ro", "/data/a,b,,c", readonly=True))
    argv = build(cfg(shared_dirs=shares))
    assert opt(argv, "-fsdev") == [
        "local,id=fsdev0,path=/run/kata-colo/shared/sb1,security_model=none,multidevs=remap",
        "local,id=fsdev1,path=/data/a,,b,,,,c,security_model=none,multidevs=remap,readonly=on",
    ]
    mapped = build(cfg(shared_dirs=shares[:1], security_model="mapped-xattr"))
    assert opt(mapped, "-fsdev") == [
        "local,id=fsdev0,path=/run/kata-colo/shared/sb1,security_model=mapped-xattr,multidevs=remap"]
    devices = opt(argv, "-device")
    assert "virtio-9p-pci,id=fs0,fsdev=fsdev0,mount_tag=kataShared" in devices
    assert "virtio-9p-pci,id=fs1,fsdev=fsdev1,mount_tag=ro" in devices


def test_state_dir_commas_are_escaped_in_chardevs_but_not_pidfile():
    argv = build(cfg(state_dir="/run/a,b"))
    assert "socket,id=charqmp0,path=/run/a,,b/qmp.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert opt(argv, "-pidfile") == ["/run/a,b/qemu.pid"]


def test_tap_nics_single_and_multiqueue_and_root_ports():
    nics = (NetDevice("eth0", "02:00:00:00:00:01", (5,)),
            NetDevice("eth1", "02:00:00:00:00:02", (6, 7), vhost=True))
    argv = build(cfg(nics=nics, pcie_root_ports=2))
    assert opt(argv, "-netdev") == ["tap,id=net0,fd=5,vhost=off", "tap,id=net1,fds=6:7,vhost=on"]
    devices = opt(argv, "-device")
    assert "virtio-net-pci,id=eth0,netdev=net0,mac=02:00:00:00:00:01" in devices
    assert "virtio-net-pci,id=eth1,netdev=net1,mac=02:00:00:00:00:02,mq=on,vectors=6" in devices
    assert "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=0" in devices
    assert "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=0" in devices


def test_no_balloon():
    argv = build(cfg(balloon=False))
    assert not any("balloon" in d for d in opt(argv, "-device"))


def test_vsock_with_a_reserved_cid_fd():
    argv = build(cfg(agent_channel="vsock", vsock_cid=9, vsock_fd=11))
    assert "vhost-vsock-pci,id=vsock0,guest-cid=9,vhostfd=11" in opt(argv, "-device")


def test_cold_plugged_disks_and_vfio():
    disks = (BlockDevice("layer0", "/c/l0.erofs", readonly=True, serial="l0"),
             BlockDevice("scratch0", "/c/s0.img", driver="virtio-scsi"),
             BlockDevice("data0", "/dev/loop7", driver="nvme"))
    argv = build(cfg(disks=disks, vfio=(VfioDevice("hostdev0", "0000:3b:00.0"),)))
    assert opt(argv, "-blockdev") == [
        "driver=raw,node-name=layer0-blk,read-only=on,file.driver=file,file.filename=/c/l0.erofs,file.read-only=on",
        "driver=raw,node-name=scratch0-blk,read-only=off,file.driver=file,file.filename=/c/s0.img,file.read-only=off",
        "driver=raw,node-name=data0-blk,read-only=off,file.driver=file,file.filename=/dev/loop7,file.read-only=off"]
    devices = opt(argv, "-device")
    assert "virtio-blk-pci,id=layer0,drive=layer0-blk,serial=l0" in devices
    assert "virtio-scsi-pci,id=scsi0" in devices
    assert "scsi-hd,id=scratch0,drive=scratch0-blk,bus=scsi0.0" in devices
    assert "nvme,id=data0,drive=data0-blk,serial=data0" in devices
    # kata's cold_plug_vfio = "root-port": each VFIO function behind its own root port
    assert "pcie-root-port,id=rpv0,bus=pcie.0,chassis=1,slot=0" in devices
    assert "vfio-pci,id=hostdev0,host=0000:3b:00.0,bus=rpv0" in devices


@pytest.mark.parametrize("changes, fragment", [
    (dict(vcpus=0), "vcpus"),
    (dict(vcpus=4, max_vcpus=2), "max_vcpus"),
    (dict(vcpus=300), "vcpus"),
    (dict(memory_mib=16), "memory_mib"),
    (dict(memory_mib=1024, max_memory_mib=512, memory_slots=2), "max_memory_mib"),
    (dict(memory_mib=512, max_memory_mib=1024, memory_slots=0), "memory_slots"),
    (dict(kernel=""), "kernel"),
    (dict(accel="xen"), "accel"),
    (dict(machine="virt"), "machine"),
    (dict(vm_id="a,b"), "VM id"),
    (dict(vm_id=""), "VM id"),
    (dict(disks=(BlockDevice("d0", "rel.img"),)), "absolute"),
    (dict(disks=(BlockDevice("d0", "/x.img", driver="ide"),)), "driver"),
    (dict(disks=(BlockDevice("d0", "/x.img"),), nics=(NetDevice("d0", "02:00:00:00:00:01", (5,)),)), "duplicate"),
    (dict(vfio=(VfioDevice("h0", "3b:00.0"),)), "PCI address"),
    (dict(security_model="passthrough"), "ninep_security_model"),
    (dict(state_dir="relative/dir"), "state_dir"),
    (dict(state_dir="/" + "x" * 120), "too long"),
    (dict(kernel_params="init=/bin/sh;reboot"), "kernel_params"),
    (dict(kernel_params="a\nb"), "kernel_params"),
    (dict(kernel="/img/vm\nlinux"), "kernel"),
    (dict(agent_channel="vsock", vsock_cid=2), "cid"),
    (dict(agent_channel="hybrid-vsock"), "hybrid-vsock"),
    (dict(shared_dirs=(SharedDir("bad tag", "/x"),)), "tag"),
    (dict(shared_dirs=(SharedDir("t", "/x"), SharedDir("t", "/y"))), "duplicate"),
    (dict(shared_dirs=(SharedDir("t", "x"),)), "absolute"),
    (dict(shared_dirs=(SharedDir("t", "/x\x00y"),)), "control"),
    (dict(nics=(NetDevice("eth0", "zz:00:00:00:00:01", (5,)),)), "MAC"),
    (dict(nics=(NetDevice("eth0", "02:00:00:00:00:01", ()),)), "tap fds"),
    (dict(nics=(NetDevice("eth,0", "02:00:00:00:00:01", (5,)),)), "device id"),
    (dict(pcie_root_ports=40), "pcie_root_ports"),
    (dict(pcie_root_ports=1, machine="pc"), "q35"),
    (dict(cpu_model="max;rm"), "cpu model"),
])
def test_invalid_configs_raise_invalid_argument(changes, fragment):
    with pytest.raises(InvalidArgument) as err:
        build(cfg(**changes))
    assert fragment in str(err.value)


def test_opt_value_escapes_and_rejects():
    assert cmdline.opt_value("/a,b", "p") == "/a,,b"
    with pytest.raises(InvalidArgument):
        cmdline.opt_value("", "p")
    with pytest.raises(InvalidArgument):
        cmdline.opt_value("/a\tb", "p")
