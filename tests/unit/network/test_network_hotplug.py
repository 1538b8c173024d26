"""The pod network resource on a VM that did not boot with its NICs (a template clone): each NIC
is hot-plugged with its veth's MAC and the guest is told the PCI path to wait for."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.errors import FailedPrecondition
from hypervisor.base import NetDevice, VmConfig
from hypervisor.qemu.options import QemuOptions
from shim.resources.manager import ResourceContext
from shim.resources.network.resource import NetworkResource
from tests.unit.factory.fakehv import FakeHv


@dataclass
class StubPod:
    closed: int = 0
    macs: tuple[str, ...] = ("02:00:00:00:00:0a", "02:00:00:00:00:0b")

    def nics(self, vhost: bool = False) -> tuple[NetDevice, ...]:
        return tuple(NetDevice(f"net{i}", m, (100 + i,)) for i, m in enumerate(self.macs))

    def close_fds(self) -> None:
        self.closed += 1

    def guest_config(self):
        ifaces = [{"device": f"eth{i}", "name": f"eth{i}", "hwAddr": m.upper(), "mtu": 1500, "IPAddresses": []}
                  for i, m in enumerate(self.macs)]
        return ifaces, [{"dest": "default"}], []


@dataclass
class StubAgent:
    calls: list = field(default_factory=list)

    async def configure_network(self, interfaces, routes, neighbors):
        self.calls.append((interfaces, routes, neighbors))


async def resource_on(tmp_path: Path, ports: int, plugged_at_boot: bool):
    hv = FakeHv([])
    await hv.prepare(VmConfig(vm_id="v", state_dir=str(tmp_path / "vm"), kernel="/k", hypervisor_path="/q",
                              options=QemuOptions(pcie_root_ports=ports)))
    r = NetworkResource("/var/run/netns/x")
    r.pod = StubPod()  # type: ignore[assignment]
    agent = StubAgent()
    ctx = ResourceContext(sandbox_id="sb", state_dir=tmp_path, config=None, spec={}, hypervisor=hv,
                          agent=agent, plugged_at_boot=plugged_at_boot)
    return r, hv, agent, ctx


async def test_a_clone_gets_its_nics_hot_plugged_with_their_macs(tmp_path):
    r, hv, agent, ctx = await resource_on(tmp_path, ports=2, plugged_at_boot=False)
    await r.after_boot(ctx)
    assert [(d.id, d.mac, d.tap_fds) for d in hv.devices] == [("net0", "02:00:00:00:00:0a", (100,)),
                                                             ("net1", "02:00:00:00:00:0b", (101,))]
    (ifaces, routes, _), = agent.calls
    assert [i["devicePath"] for i in ifaces] == ["02/00", "03/00"] and routes == [{"dest": "default"}]
    assert r.pod.closed == 1  # the shim's fd copies go once QEMU holds its own


async def test_a_cold_booted_vm_is_not_hot_plugged(tmp_path):
    r, hv, agent, ctx = await resource_on(tmp_path, ports=2, plugged_at_boot=True)
    await r.after_boot(ctx)
    assert hv.devices == [] and "devicePath" not in agent.calls[0][0][0]


async def test_no_root_port_is_a_clear_error(tmp_path):
    r, hv, agent, ctx = await resource_on(tmp_path, ports=0, plugged_at_boot=False)
    with pytest.raises(FailedPrecondition, match="pcie_root_ports"):
        await r.after_boot(ctx)
    assert agent.calls == []
