"""``[runtime] hypervisor = "clh"`` with a ``[hypervisor.clh]`` table: shared keys land in
HypervisorConfig, CH-only keys in ClhOptions, and the sandbox's VmConfig builds a valid vm.create."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from clh_testlib import request_validator

from common.errors import ConfigError
from hypervisor.clh import vmconfig
from hypervisor.clh.options import ClhOptions
from shim import config
from shim.sandbox.vmconfig import vm_config

CLH = """
[runtime]
hypervisor = "clh"

[hypervisor.clh]
path = "/opt/ch/cloud-hypervisor"
kernel = "/images/vmlinux"
image = "/images/rootfs.img"
initrd = ""
default_vcpus = 2
default_maxvcpus = 4
default_memory = 1024
default_maxmemory = 2048
shared_fs = "none"
hotplug_method = "virtio-mem"
reclaim_guest_freed_memory = true
entropy_source = "/dev/random"

[agent.kata]
transport = "hybrid-vsock"
"""


CLH_TABLE = '[runtime]\nhypervisor = "clh"\n[hypervisor.clh]\n'


def test_clh_table_splits_into_shared_and_driver_keys():
    cfg = config.parse(CLH)
    hv = cfg.hypervisor
    assert cfg.runtime.hypervisor == "clh"
    assert (hv.binary, hv.kernel, hv.image, hv.initrd) == ("/opt/ch/cloud-hypervisor", "/images/vmlinux",
                                                           "/images/rootfs.img", "")
    assert (hv.default_vcpus, hv.default_maxvcpus, hv.default_memory, hv.default_maxmemory) == (2, 4, 1024, 2048)
    assert hv.options == ClhOptions(hotplug_method="virtio-mem", reclaim_guest_freed_memory=True,
                                    entropy_source="/dev/random")


def test_default_binary_is_kata_s():
    cfg = config.parse('[runtime]\nhypervisor = "clh"\n[hypervisor.clh]\nshared_fs = "none"\n'
                       '[agent.kata]\ntransport = "hybrid-vsock"\n')
    assert cfg.hypervisor.binary == "/usr/bin/cloud-hypervisor" == ClhOptions.DEFAULT_PATH
    assert cfg.hypervisor.options == ClhOptions()


def test_sandbox_vm_config_is_a_valid_vm_create(tmp_path: Path):
    cfg = config.parse(CLH)
    vm = vm_config(cfg, "sb1", tmp_path / "vm")
    assert vm.agent_channel == "hybrid-vsock" and isinstance(vm.options, ClhOptions)
    body = vmconfig.build_vm_config(vm)
    assert [e.message for e in request_validator("vm.create").iter_errors(body)] == []
    assert body["memory"]["hotplug_method"] == "VirtioMem" and body["balloon"]["free_page_reporting"] is True


@pytest.mark.parametrize("text, fragment", [
    (CLH_TABLE + 'hotplug_method = "dimm"\n', "hypervisor.clh.hotplug_method"),
    (CLH_TABLE + 'machine_type = "q35"\n', "unknown key hypervisor.clh.machine_type"),
    ('[hypervisor.qemu]\nhotplug_method = "acpi"\n', "unknown key hypervisor.qemu.hotplug_method"),
    (CLH_TABLE + 'enable_balloon = "yes"\n', "wrong type"),
    # a [hypervisor.clh] table is validated even when qemu is selected
    ('[hypervisor.clh]\nentropy_source = "rel"\n', "hypervisor.clh.entropy_source"),
])
def test_bad_clh_config(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config.parse(text)


def test_the_shipped_commented_example_is_a_valid_clh_table():
    text = (Path(config.__file__).parent / "defaults" / "configuration.toml").read_text()
    block = text[text.index("# [hypervisor.clh]"):text.index("\n[agent.kata]\n")]
    lines = [m.group(1) for line in block.splitlines()
             if (m := re.match(r"# (\[hypervisor\.clh\]|[a-z_]+ = .*)$", line))]
    assert lines[0] == "[hypervisor.clh]" and len(lines) > 10
    cfg = config.parse('[runtime]\nhypervisor = "clh"\n' + "\n".join(lines) +
                       '\n[agent.kata]\ntransport = "hybrid-vsock"\n')
    assert (cfg.hypervisor.binary, cfg.hypervisor.shared_fs) == ("/usr/bin/cloud-hypervisor", "none")
    assert cfg.hypervisor.options == ClhOptions()
