"""VmConfig → Cloud Hypervisor argv and vm.create body (pure, no VMM)."""
from __future__ import annotations

from pathlib import Path

import pytest
from clh_testlib import FAKE_CLH, make_cfg

from common.errors import ConfigError, HypervisorError, InvalidArgument
from hypervisor.base import BlockDevice, NetDevice
from hypervisor.clh import vmconfig
from hypervisor.clh.options import ClhOptions

MIB = 1 << 20


def test_command_line(tmp_path: Path):
    cfg = make_cfg(tmp_path)
    sock = str(tmp_path / "vm" / "clh-api.sock")
    assert vmconfig.build_argv(cfg) == [FAKE_CLH, "--api-socket", f"path={sock}"]
    debug = make_cfg(tmp_path, debug=True, options=ClhOptions(disable_seccomp=True))
    assert vmconfig.build_argv(debug) == [FAKE_CLH, "--api-socket", f"path={sock}", "-v", "--seccomp", "false"]


def test_vm_create_body(tmp_path: Path):
    cfg = make_cfg(tmp_path, max_memory_mib=1000, kernel_params="agent.log=debug")
    body = vmconfig.build_vm_config(cfg)
    state = tmp_path / "vm"
    assert body["cpus"] == {"boot_vcpus": 2, "max_vcpus": 4, "topology": {
        "threads_per_core": 1, "cores_per_die": 4, "dies_per_package": 1, "packages": 1}}
    # 488 MiB of headroom → 384 MiB: whole 128 MiB blocks
    assert body["memory"] == {"size": 512 * MIB, "shared": False, "hotplug_method": "Acpi",
                              "hotplug_size": 384 * MIB}
    assert body["payload"] == {"kernel": cfg.kernel, "initramfs": cfg.initrd, "cmdline":
                               "console=ttyS0 panic=1 no_timer_check noreplace-smp quiet rdinit=/init agent.log=debug"}
    assert body["serial"] == {"mode": "File", "file": str(state / "console.log")}
    assert body["console"] == {"mode": "Off"}
    assert body["vsock"] == {"cid": 3, "socket": str(state / "clh.sock")}
    assert body["balloon"] == {"size": 0, "deflate_on_oom": True, "free_page_reporting": False}
    assert body["rng"] == {"src": "/dev/urandom"}
    assert "net" not in body and "disks" not in body and "fs" not in body


def test_image_is_the_first_read_only_disk(tmp_path: Path):
    cfg = make_cfg(tmp_path, image="/img/rootfs.img", initrd="", disks=(BlockDevice("d0", "/dev/loop1"),))
    body = vmconfig.build_vm_config(cfg)
    assert body["disks"][0] == {"path": "/img/rootfs.img", "readonly": True, "id": "rootfs"}
    assert body["disks"][1]["id"] == "d0"
    assert "root=/dev/vda ro" in body["payload"]["cmdline"] and "initramfs" not in body["payload"]
    with pytest.raises(InvalidArgument, match="duplicate device ids"):
        vmconfig.validate(make_cfg(tmp_path, image="/i", disks=(BlockDevice("rootfs", "/x"),)))


def test_no_hotplug_without_headroom(tmp_path: Path):
    body = vmconfig.build_vm_config(make_cfg(tmp_path, max_memory_mib=600,
                                             options=ClhOptions(hotplug_method="virtio-mem")))
    assert body["memory"] == {"size": 512 * MIB, "shared": False, "hotplug_method": "VirtioMem"}


def test_nic_queue_pairs():
    nic = NetDevice("n0", "02:00:00:00:00:01", (7, 8, 9))
    assert vmconfig.net_config(nic, 4) == {"id": "n0", "mac": "02:00:00:00:00:01", "num_queues": 6, "queue_size": 256}
    with pytest.raises(InvalidArgument, match="exceed"):
        vmconfig.net_config(nic, 2)
    with pytest.raises(InvalidArgument, match="above 2"):
        vmconfig.net_config(NetDevice("n0", "02:00:00:00:00:01", (2,)), 2)
    with pytest.raises(InvalidArgument, match="bad MAC"):
        vmconfig.net_config(NetDevice("n0", "zz", (7,)), 2)


@pytest.mark.parametrize("bdf, path", [("0000:00:05.0", "05"), ("0000:00:1f.0", "1f"), ("0000:00:0A.0", "0a")])
def test_guest_pci_path(bdf, path):
    assert vmconfig.guest_pci_path(bdf) == path


@pytest.mark.parametrize("bdf", ["0000:01:00.0", "0000:00:05.1", "00:05.0", "0001:00:05.0", ""])
def test_guest_pci_path_refuses_what_kata_refuses(bdf):
    with pytest.raises(HypervisorError, match="unexpected PCI address"):
        vmconfig.guest_pci_path(bdf)


@pytest.mark.parametrize("opts, fragment", [
    (ClhOptions(hotplug_method="dimm"), "hotplug_method"),
    (ClhOptions(entropy_source="urandom"), "entropy_source"),
    (ClhOptions(enable_balloon=False, reclaim_guest_freed_memory=True), "needs enable_balloon"),
])
def test_options_validate(opts, fragment):
    with pytest.raises(ConfigError, match=fragment):
        opts.validate()
