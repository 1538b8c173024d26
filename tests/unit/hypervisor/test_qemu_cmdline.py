import dataclasses

import pytest

from hypervisor.base import NetDevice, SharedDir, VmConfig
from hypervisor.qemu import cmdline
from common.errors import InvalidArgument

CPUINFO_VMX = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n"
CPUINFO_SVM = "processor\t: 0\nflags\t\t: fpu svm lm\n"
CPUINFO_NONE = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\nbugs\t\t: vmx_whatever\n"


def cfg(**kw) -> VmConfig:
    base = dict(sandbox_id="sb1", state_dir="/run/kata-colo/sbs/sb1/vm", kernel="/img/vmlinux",
                initrd="/img/initramfs.cpio")
    base.update(kw)
    return VmConfig(**base)


def opt(argv: list[str], flag: str) -> list[str]:
    """All values following ``flag`` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


@pytest.mark.parametrize("text, expected", [(CPUINFO_VMX, "kvm"), (CPUINFO_SVM, "kvm"),
                                            (CPUINFO_NONE, "tcg"), ("", "tcg")])
def test_auto_accel_follows_cpu_flags(text, expected):
    argv = cmdline.build_argv(cfg(accel="auto"), text)
    if expected == "kvm":
        assert opt(argv, "-accel") == ["kvm"]
        assert opt(argv, "-cpu") == ["host"]
    else:
        assert opt(argv, "-accel") == ["tcg,thread=multi"]
        assert opt(argv, "-cpu") == ["max"]
    assert not any("thread=" in m for m in opt(argv, "-machine"))


def test_explicit_accel_wins_over_cpuinfo():
    assert opt(cmdline.build_argv(cfg(accel="tcg"), CPUINFO_VMX), "-accel") == ["tcg,thread=multi"]
    assert opt(cmdline.build_argv(cfg(accel="kvm"), CPUINFO_NONE), "-accel") == ["kvm"]
    assert opt(cmdline.build_argv(cfg(accel="tcg", cpu_model="qemu64"), ""), "-cpu") == ["qemu64"]


def test_smp_and_memory_without_hotplug():
    argv = cmdline.build_argv(cfg(vcpus=2, memory_mib=512), "")
    assert opt(argv, "-smp") == ["2,maxcpus=2"]
    assert opt(argv, "-m") == ["512M"]
    argv = cmdline.build_argv(cfg(vcpus=2, max_vcpus=4), "")
    assert opt(argv, "-smp") == ["2,maxcpus=4"]


def test_memory_hotplug_args():
    argv = cmdline.build_argv(cfg(memory_mib=1024, max_memory_mib=4096, memory_slots=3), "")
    assert opt(argv, "-m") == ["1024M,slots=3,maxmem=4096M"]


def test_base_devices_sockets_and_logs_live_under_state_dir():
    c = cfg()
    argv = cmdline.build_argv(c, "")
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
    argv = cmdline.build_argv(cfg(initrd="", image="/img/root.img", debug=True,
                                  kernel_params="kata_colo.init=poweroff"), "")
    assert opt(argv, "-append") == ["console=ttyS0 panic=-1 root=/dev/vda ro kata_colo.init=poweroff"]
    assert "-initrd" not in argv
    assert "if=none,id=rootfs0,file=/img/root.img,format=raw,readonly=on" in opt(argv, "-drive")
    assert "virtio-blk-pci,id=rootdisk0,drive=rootfs0" in opt(argv, "-device")


def test_vsock_replaces_virtio_serial():
    argv = cmdline.build_argv(cfg(agent_channel="vsock", vsock_cid=7), "")
    devices = opt(argv, "-device")
    assert "vhost-vsock-pci,id=vsock0,guest-cid=7" in devices
    assert not any(d.startswith(("virtio-serial-pci", "virtserialport")) for d in devices)
    assert not any("charagent0" in c for c in opt(argv, "-chardev"))


def test_9p_shares_with_comma_escaping_and_readonly():
    shares = (SharedDir("kataShared", "/run/kata-colo/shared/sb1"),
              SharedDir("ro", "/data/a,b,,c", readonly=True))
    argv = cmdline.build_argv(cfg(shared_dirs=shares), "")
    assert opt(argv, "-fsdev") == [
        "local,id=fsdev0,path=/run/kata-colo/shared/sb1,security_model=none,multidevs=remap",
        "local,id=fsdev1,path=/data/a,,b,,,,c,security_model=none,multidevs=remap,readonly=on",
    ]
    devices = opt(argv, "-device")
    assert "virtio-9p-pci,id=fs0,fsdev=fsdev0,mount_tag=kataShared" in devices
    assert "virtio-9p-pci,id=fs1,fsdev=fsdev1,mount_tag=ro" in devices


def test_state_dir_commas_are_escaped_in_chardevs_but_not_pidfile():
    argv = cmdline.build_argv(cfg(state_dir="/run/a,b"), "")
    assert "socket,id=charqmp0,path=/run/a,,b/qmp.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert opt(argv, "-pidfile") == ["/run/a,b/qemu.pid"]


def test_tap_nics_single_and_multiqueue_and_root_ports():
    nics = (NetDevice("eth0", "02:00:00:00:00:01", (5,)),
            NetDevice("eth1", "02:00:00:00:00:02", (6, 7), vhost=True))
    argv = cmdline.build_argv(cfg(nics=nics, pcie_root_ports=2), "")
    assert opt(argv, "-netdev") == ["tap,id=net0,fd=5,vhost=off", "tap,id=net1,fds=6:7,vhost=on"]
    devices = opt(argv, "-device")
    assert "virtio-net-pci,id=eth0,netdev=net0,mac=02:00:00:00:00:01" in devices
    assert "virtio-net-pci,id=eth1,netdev=net1,mac=02:00:00:00:00:02,mq=on,vectors=6" in devices
    assert "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=0" in devices
    assert "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=0" in devices


def test_no_balloon_and_extra_args():
    argv = cmdline.build_argv(cfg(balloon=False, extra_args=("-S",)), "")
    assert not any("balloon" in d for d in opt(argv, "-device"))
    assert argv[-1] == "-S"


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
    (dict(sandbox_id="a,b"), "sandbox id"),
    (dict(sandbox_id=""), "sandbox id"),
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
        cmdline.build_argv(dataclasses.replace(cfg(), **changes), "")
    assert fragment in str(err.value)


def test_opt_value_escapes_and_rejects():
    assert cmdline.opt_value("/a,b", "p") == "/a,,b"
    with pytest.raises(InvalidArgument):
        cmdline.opt_value("", "p")
    with pytest.raises(InvalidArgument):
        cmdline.opt_value("/a\tb", "p")
