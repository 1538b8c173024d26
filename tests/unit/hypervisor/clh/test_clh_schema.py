"""The schema covers exactly the calls the driver makes, names its upstream version, and the
bodies the driver builds (without a VMM) validate against it; the schema itself catches
misspelt fields, wrong types and missing required fields."""
from __future__ import annotations

from pathlib import Path

import pytest
from clh_testlib import SCHEMA, make_cfg, request_validator, schema_validator

from hypervisor.base import BlockDevice, NetDevice, VfioDevice
from hypervisor.clh import api, vmconfig
from hypervisor.clh.options import ClhOptions


def test_schema_names_its_upstream():
    up = SCHEMA["x-upstream"]
    assert up["repository"] == "cloud-hypervisor/cloud-hypervisor"
    assert up["path"] == "vmm/src/api/openapi/cloud-hypervisor.yaml"
    assert up["info.version"] == "0.3.0" and up["server"] == "http://localhost/api/v1"
    assert len(up["commit"]) == 40
    assert api.API_PREFIX == "/api/v1/"


def test_every_call_the_driver_makes_is_in_the_schema_with_its_method():
    paths = SCHEMA["x-paths"]
    assert set(api.TIMEOUTS) == set(paths)
    for endpoint, spec in paths.items():
        assert spec["method"] == ("GET" if endpoint in api.GET_ENDPOINTS else "PUT"), endpoint


def test_vm_create_bodies_validate(tmp_path: Path):
    check = request_validator("vm.create")
    configs = [
        make_cfg(tmp_path),
        make_cfg(tmp_path, image="/images/rootfs.img", initrd="", debug=True,
                 disks=(BlockDevice("d0", "/dev/loop3", serial="abc"),),
                 vfio=(VfioDevice("v0", "0000:3b:00.0"),),
                 options=ClhOptions(hotplug_method="virtio-mem", reclaim_guest_freed_memory=True)),
        make_cfg(tmp_path, max_vcpus=0, max_memory_mib=0, options=ClhOptions(enable_balloon=False)),
    ]
    for cfg in configs:
        body = vmconfig.build_vm_config(cfg)
        assert [e.message for e in check.iter_errors(body)] == []


def test_device_bodies_validate():
    nic = NetDevice("n0", "02:00:00:00:00:01", (10, 11))
    assert not list(request_validator("vm.add-net").iter_errors(vmconfig.net_config(nic, 2)))
    disk = BlockDevice("d0", "/dev/loop3", readonly=True, serial="s1")
    assert not list(request_validator("vm.add-disk").iter_errors(vmconfig.disk_config(disk, 2)))
    dev = VfioDevice("v0", "0000:3b:00.0")
    assert not list(request_validator("vm.add-device").iter_errors(vmconfig.device_config(dev)))
    for body in ({"desired_vcpus": 3}, {"desired_ram": 640 << 20}, {"desired_balloon": 0}):
        assert not list(request_validator("vm.resize").iter_errors(body))
    assert not list(request_validator("vm.restore").iter_errors({"source_url": "file:///s", "resume": True}))


@pytest.mark.parametrize("name, body", [
    ("VmConfig", {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}),                          # payload is required
    ("VmConfig", {"payload": {"kernel": "/k"}, "memory": {"size": 1, "hotplugsize": 2}}),  # misspelt field
    ("CpusConfig", {"boot_vcpus": 0, "max_vcpus": 1}),                                 # minimum 1
    ("NetConfig", {"mac": "02:00:00:00:00:01", "num_queues": "2"}),                    # wrong type
    ("DiskConfig", {"path": "/x", "pci_device_id": 256}),                              # uint8 bound
    ("VsockConfig", {"cid": 2, "socket": "/s"}),                                       # cid >= 3
    ("SerialConfig", {"mode": "Serial"}),                                              # enum
    ("RestoreConfig", {"resume": True}),                                               # source_url required
    ("VmResize", {"desired_vcpus": 0}),
])
def test_schema_rejects(name, body):
    assert list(schema_validator(name).iter_errors(body))
