"""The QEMU side of VM templating without a VM: the clone/template command line, the exec: URIs,
the VmConfig round trip an adopting process relies on, AdoptedProcess on a real child."""
from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys

import pytest

from common.errors import HypervisorError, InvalidArgument
from hypervisor.base import BlockDevice, NetDevice, SharedDir, VmConfig, vm_config_from_dict, vm_config_to_dict
from hypervisor.qemu import cmdline
from hypervisor.qemu.options import QemuOptions
from hypervisor.qemu.template import EXIT_NOT_CHILD, AdoptedProcess, exec_in, exec_out


def cfg(**kw) -> VmConfig:
    opts = kw.pop("options", QemuOptions())
    base = dict(vm_id="vm1", state_dir="/run/kata-colo/vm/vm1", kernel="/img/vmlinux", initrd="/img/initrd",
                hypervisor_path="/usr/bin/qemu-system-x86_64", memory_mib=512)
    base.update(kw)
    return VmConfig(**base, options=opts)


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_template_vm_maps_its_memory_file_shared_and_gets_a_generation_id():
    argv = cmdline.build_argv(cfg(memory_file="/run/t/memory", memory_shared=True), "tcg")
    assert opt(argv, "-machine") == ["q35,memory-backend=ram0"]
    assert "memory-backend-file,id=ram0,size=512M,mem-path=/run/t/memory,share=on" in opt(argv, "-object")
    assert "vmgenid,id=vmgenid0,guid=auto" in opt(argv, "-device")
    assert "-incoming" not in argv


def test_clone_maps_it_private_and_waits_for_incoming_state():
    argv = cmdline.build_argv(cfg(memory_file="/run/t/memory"), "tcg", incoming=True)
    assert "memory-backend-file,id=ram0,size=512M,mem-path=/run/t/memory,share=off" in opt(argv, "-object")
    assert argv[-2:] == ["-incoming", "defer"]


def test_anonymous_ram_vm_has_no_backend_nor_vmgenid():
    argv = cmdline.build_argv(cfg(), "tcg")
    assert opt(argv, "-machine") == ["q35"]
    assert not opt(argv, "-object")
    assert not any(d.startswith("vmgenid") for d in opt(argv, "-device"))


def test_tb_size_and_free_page_reporting_options():
    o = QemuOptions(tcg_tb_size=32, reclaim_guest_freed_memory=True)
    argv = cmdline.build_argv(cfg(options=o), "tcg")
    assert opt(argv, "-accel") == ["tcg,thread=multi,tb-size=32"]
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on" in opt(argv, "-device")
    assert opt(cmdline.build_argv(cfg(options=o), "kvm"), "-accel") == ["kvm"]


def test_free_page_reporting_is_refused_on_a_copy_on_write_memory_file():
    o = QemuOptions(reclaim_guest_freed_memory=True)
    with pytest.raises(InvalidArgument, match="punch holes"):
        cmdline.build_argv(cfg(options=o, memory_file="/run/t/memory"), "tcg")
    cmdline.build_argv(cfg(options=o, memory_file="/run/t/memory", memory_shared=True), "tcg")  # a template may


def test_memory_file_must_be_absolute_and_commas_are_escaped():
    with pytest.raises(InvalidArgument):
        cmdline.build_argv(cfg(memory_file="memory"), "tcg")
    argv = cmdline.build_argv(cfg(memory_file="/run/a,b/memory", memory_shared=True), "tcg")
    assert any("mem-path=/run/a,,b/memory," in o for o in opt(argv, "-object"))


def test_exec_uris_quote_paths_for_the_shell():
    assert exec_out("/run/t/state") == "exec:cat > /run/t/state"
    assert exec_in("/run/t x/st'ate") == "exec:cat '/run/t x/st'\"'\"'ate'"


def test_vm_config_round_trips_without_fds():
    c = cfg(shared_dirs=(SharedDir("kataShared", "/run/s/shared"),),
            nics=(NetDevice("net0", "02:00:00:00:00:01", (7,)),),
            disks=(BlockDevice("d0", "/img/d", readonly=True),), vsock_fd=9,
            options=QemuOptions(pcie_root_ports=2), memory_file="/run/t/memory")
    data = vm_config_to_dict(c)
    back = vm_config_from_dict(data, QemuOptions)
    assert back == dataclasses.replace(c, nics=(), vsock_fd=-1)
    import json

    json.dumps(data)  # JSON-able
    with pytest.raises(TypeError):
        vm_config_from_dict({**data, "bogus": 1}, QemuOptions)


async def test_adopted_process_sees_exit_and_signals_by_pidfd():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc = AdoptedProcess(child.pid)
        assert not proc.exited()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == EXIT_NOT_CHILD
        assert child.wait(5) == -signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)  # its fd is closed: no signal to a reused pid
    finally:
        child.kill()
        child.wait()


def test_adopting_a_dead_pid_fails():
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(HypervisorError):
        AdoptedProcess(child.pid)


async def test_adopt_refuses_a_process_that_is_not_this_vms_qemu(tmp_path):
    from hypervisor.qemu.driver import QemuHypervisor

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        c = cfg(state_dir=str(tmp_path / "vm"))
        record = {"state_dir": c.state_dir, "pid": child.pid, "config": vm_config_to_dict(c)}
        hv = QemuHypervisor()
        with pytest.raises(HypervisorError, match="not the QEMU"):
            await hv.adopt(record, timeout=1)
        assert hv.vmm_pid() is None and child.poll() is None  # untouched, and hv still empty
        with pytest.raises(InvalidArgument):
            await hv.adopt({**record, "state_dir": "/elsewhere"}, timeout=1)
        with pytest.raises(InvalidArgument):
            await hv.adopt({"pid": "x"}, timeout=1)
    finally:
        child.kill()
        child.wait()
