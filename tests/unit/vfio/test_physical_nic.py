"""Physical endpoints: PCI NICs in the pod netns (ethtool bus-info) are passed through; veths and
other virtual links are not; the resource journals and restores the host driver."""
import socket
import subprocess
import uuid

import pytest

from hypervisor.base import VfioDevice
from shim.resources.manager import ResourceContext
from shim.resources.vfio import physical, sysfs
from tests.unit.vfio.fakesys import FakePci


def test_bus_info_is_a_pci_address_only_for_pci_nics():
    assert physical.pci_address("0000:3B:00.1") == "0000:3b:00.1"
    assert physical.pci_address("") == "" and physical.pci_address("tap") == "" and physical.pci_address("N/A") == ""


@pytest.mark.root
def test_a_netns_with_only_a_veth_has_no_physical_nic():
    ns = f"kc-phys-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True)
        assert physical.scan_netns(f"/var/run/netns/{ns}") == []
        assert physical.run_in_netns(f"/var/run/netns/{ns}", lambda: physical.bus_info("eth0")) == ""
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_agent_interface_carries_mac_addresses_and_pci_path():
    nic = physical.PhysicalNic("eth1", "0000:5e:00.1", "52:54:00:12:34:56", 9000,
                               [("10.1.2.3", 24, socket.AF_INET)], guest_pci_path="04/00")
    assert nic.to_agent_interface() == {"name": "eth1", "hwAddr": "52:54:00:12:34:56", "mtu": 9000,
                                        "devicePath": "04/00",
                                        "IPAddresses": [{"family": 0, "address": "10.1.2.3", "mask": "24"}]}


async def test_resource_binds_journaled_and_restores(tmp_path, monkeypatch):
    pci = FakePci(tmp_path / "root")
    pci.add("0000:5e:00.1", "13", 0x020000, "ice")
    pci.original = {"0000:5e:00.1": "ice"}
    monkeypatch.setattr(sysfs, "_write", pci.write)
    nic = physical.PhysicalNic("eth1", "0000:5e:00.1", "52:54:00:12:34:56", 1500)
    res = physical.PhysicalNicResource("sb1", [nic], str(tmp_path / "claims"), has_veth=False, host_paths=pci.paths)
    records = []
    ctx = ResourceContext("sb1", tmp_path, None, {}, None, persist=lambda: records.append(res.record()))
    patch = await res.before_boot(ctx)
    assert patch.vfio == (VfioDevice("kpn00", "0000:5e:00.1"),) and pci.driver("0000:5e:00.1") == "vfio-pci"
    assert records[-1]["vfio"] == [{"bdf": "0000:5e:00.1", "original": "ice"}]
    await physical.PhysicalNicResource.recover(res.record())
    assert pci.driver("0000:5e:00.1") == "ice" and not (tmp_path / "claims" / "pci-0000:5e:00.1").exists()
