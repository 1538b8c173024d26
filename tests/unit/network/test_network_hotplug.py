"""The pod network resource on a VM that did not boot with its NICs (a template clone): the VM
factory hot-plugged each with its veth's MAC; the guest is told the PCI path to wait for."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.errors import FailedPrecondition
from hypervisor.base import AttachedDevice, NetDevice
from shim.resources.manager import ResourceContext
from shim.resources.network.resource import NetworkResource


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


def resource_on(tmp_path: Path, plugged_at_boot: bool, attached: dict):
    r = NetworkResource("/var/run/netns/x")
    r.pod = StubPod()  # type: ignore[assignment]
    agent = StubAgent()
    ctx = ResourceContext(sandbox_id="sb", state_dir=tmp_path, config=None, spec={}, hypervisor=None,
                          agent=agent, plugged_at_boot=plugged_at_boot, attached=attached)
    return r, agent, ctx


async def test_a_clone_tells_the_guest_where_its_hot_plugged_nics_are(tmp_path):
    r, agent, ctx = resource_on(tmp_path, False, {"net0": AttachedDevice("net0", "02/00"),
                                                  "net1": AttachedDevice("net1", "03/00")})
    await r.after_boot(ctx)
    (ifaces, routes, _), = agent.calls
    assert [(i["hwAddr"], i["devicePath"]) for i in ifaces] == [("02:00:00:00:00:0A", "02/00"),
                                                                ("02:00:00:00:00:0B", "03/00")]
    assert routes == [{"dest": "default"}] and r.pod.closed == 1  # QEMU holds its own fds now


async def test_a_cold_booted_vm_gets_no_device_paths(tmp_path):
    r, agent, ctx = resource_on(tmp_path, True, {})
    await r.after_boot(ctx)
    assert "devicePath" not in agent.calls[0][0][0]


async def test_a_nic_the_factory_did_not_plug_is_a_clear_error(tmp_path):
    r, agent, ctx = resource_on(tmp_path, False, {"net0": AttachedDevice("net0", "02/00")})
    with pytest.raises(FailedPrecondition, match="NIC net1 was not plugged"):
        await r.after_boot(ctx)
    assert agent.calls == []
