"""The template key: what shapes a VM is in it, what is each VM's own is not."""
from __future__ import annotations

import dataclasses
import os

from hypervisor.base import BlockDevice, NetDevice, SharedDir, VfioDevice, VmConfig
from hypervisor.qemu.options import QemuOptions
from shim.factory import key as keymod


def vm(tmp_path, **kw) -> VmConfig:
    kernel = tmp_path / "vmlinux"
    if not kernel.exists():
        kernel.write_bytes(b"k" * 10)
    base = dict(vm_id="a", state_dir="/run/kata-colo/vm/a", kernel=str(kernel), initrd="",
                hypervisor_path="/usr/bin/qemu-system-x86_64", vcpus=2, memory_mib=512,
                shared_dirs=(SharedDir("kataShared", "/run/kata-colo/sbs/a/shared"),), options=QemuOptions())
    base.update(kw)
    return VmConfig(**base)


def test_per_vm_fields_do_not_change_the_key(tmp_path):
    a = vm(tmp_path)
    b = dataclasses.replace(a, vm_id="b", state_dir="/run/kata-colo/vm/b",
                            shared_dirs=(SharedDir("kataShared", "/run/kata-colo/sbs/b/shared"),),
                            nics=(NetDevice("net0", "02:00:00:00:00:02", (5,)),), memory_file="/t/memory")
    assert keymod.key(keymod.shape(a, "qemu")) == keymod.key(keymod.shape(b, "qemu"))


def test_shape_fields_change_the_key_and_are_named(tmp_path):
    a = vm(tmp_path)
    for change, name in ((dict(memory_mib=1024), "memory_mib"), (dict(vcpus=1), "vcpus"),
                         (dict(kernel_params="agent.runc=crun"), "kernel_params"),
                         (dict(options=QemuOptions(pcie_root_ports=2)), "options (pcie_root_ports)"),
                         (dict(shared_dirs=()), "shares")):
        b = dataclasses.replace(a, **change)
        assert keymod.key(keymod.shape(a, "qemu")) != keymod.key(keymod.shape(b, "qemu"))
        diff = keymod.differences(keymod.shape(a, "qemu"), keymod.shape(b, "qemu"))
        assert len(diff) == 1 and diff[0].startswith(name), diff


def test_a_rebuilt_kernel_is_another_template(tmp_path):
    a = vm(tmp_path)
    before = keymod.shape(a, "qemu")
    (tmp_path / "vmlinux").write_bytes(b"k" * 11)
    after = keymod.shape(a, "qemu")
    assert keymod.key(before) != keymod.key(after)
    assert keymod.differences(before, after) in (["kernel (mtime_ns, size)"], ["kernel (size)"])
    os.unlink(tmp_path / "vmlinux")
    assert keymod.shape(a, "qemu")["kernel"]["size"] == -1


def test_clone_blockers_name_what_needs_the_boot_command_line(tmp_path):
    a = vm(tmp_path)
    assert keymod.clone_blockers(a) == []
    hot = dataclasses.replace(a, disks=(BlockDevice("d0", "/x"),), vfio=(VfioDevice("v0", "0000:00:01.0"),))
    assert keymod.clone_blockers(hot) == []  # hot-pluggable into a clone
    b = dataclasses.replace(a, disks=(BlockDevice("d1", "/x", driver="virtio-scsi"),), agent_channel="vsock")
    why = keymod.clone_blockers(b)
    assert len(why) == 2 and "virtio-scsi" in why[0] and "vsock" in why[1]
