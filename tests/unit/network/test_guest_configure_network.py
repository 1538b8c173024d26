"""GuestAgent.configure_network: VethEndpoint's kata-shaped dicts → protobuf, the RPC order
(UpdateInterface per interface, one UpdateRoutes, AddARPNeighbors), bad dicts rejected before
anything is sent; and the agent's route/neighbour validation accepts what the shim sends."""
from __future__ import annotations

from typing import Any

import pytest

from agent_api.agent.network import check_interface, check_neighbor, route_entry
from agent_api.client.convert import interface_from_dict, neighbor_from_dict, route_from_dict
from agent_api.client.facade import GuestAgent
from common.errors import InvalidArgument
from hypervisor.base import AgentAddress
from proto.kata import types_pb2
from shim.resources.network.endpoint import NUD_PERMANENT, RT_SCOPE_LINK, IPAddr, Neighbor, Route, VethEndpoint


def endpoint() -> VethEndpoint:
    return VethEndpoint(
        name="veth-cni0", mac="02:AA:bb:cc:dd:01", mtu=1450, ifindex=3,
        addrs=(IPAddr("10.88.0.5", 16), IPAddr("fd00::5", 64)),
        routes=(Route(dest="", gateway="10.88.0.1"),
                Route(dest="10.88.0.0/16", source="10.88.0.5", scope=RT_SCOPE_LINK),
                Route(dest="", gateway="fd00::1", family=1),
                Route(dest="fd00::/64", family=1),
                Route(dest="192.168.7.0/24", gateway="10.88.0.254")),
        neighbors=(Neighbor("10.88.0.1", "02:00:00:00:00:01", NUD_PERMANENT),
                   Neighbor("fd00::1", "02:00:00:00:00:01", NUD_PERMANENT),
                   Neighbor("10.88.0.9", "02:00:00:00:00:09", 0x02)),
    )


def test_interface_from_dict() -> None:
    iface = interface_from_dict(endpoint().to_agent_interface("eth0"))
    assert iface == types_pb2.Interface(
        device="eth0", name="eth0", hwAddr="02:aa:bb:cc:dd:01", mtu=1450, IPAddresses=[
            types_pb2.IPAddress(family=types_pb2.v4, address="10.88.0.5", mask="16"),
            types_pb2.IPAddress(family=types_pb2.v6, address="fd00::5", mask="64")])
    check_interface(iface)


def test_routes_from_dicts() -> None:
    routes = [route_from_dict(d) for d in endpoint().to_agent_routes("eth0")]
    assert [(r.dest, r.gateway, r.device, r.source, r.scope, r.family) for r in routes] == [
        ("10.88.0.0/16", "", "eth0", "10.88.0.5", RT_SCOPE_LINK, types_pb2.v4),
        ("fd00::/64", "", "eth0", "", 0, types_pb2.v6),
        ("192.168.7.0/24", "10.88.0.254", "eth0", "", 0, types_pb2.v4),
        ("", "10.88.0.1", "eth0", "", 0, types_pb2.v4),
        ("", "fd00::1", "eth0", "", 0, types_pb2.v6)]
    for r in routes:  # the agent accepts all of them
        route_entry(r, {"eth0": 2}.__getitem__)


def test_neighbors_from_dicts() -> None:
    neighbors = [neighbor_from_dict(d) for d in endpoint().to_agent_neighbors("eth0")]
    assert neighbors == [
        types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.88.0.1", mask="32"), device="eth0",
                              lladdr="02:00:00:00:00:01", state=NUD_PERMANENT),
        types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(family=types_pb2.v6, address="fd00::1", mask="128"),
                              device="eth0", lladdr="02:00:00:00:00:01", state=NUD_PERMANENT)]
    assert [check_neighbor(n)[:2] for n in neighbors] == [("eth0", "10.88.0.1"), ("eth0", "fd00::1")]


@pytest.mark.parametrize("conv,bad", [
    (interface_from_dict, {"name": "eth0", "hwaddr": "02:00:00:00:00:01"}),   # unknown field
    (interface_from_dict, {"name": "eth0", "mtu": "big"}),
    (interface_from_dict, {"IPAddresses": [{"family": "v7", "address": "10.0.0.1"}]}),
    (route_from_dict, {"dest": "10.0.0.0/8", "scope": -1}),
    (route_from_dict, {"dest": 10}),
    (neighbor_from_dict, {"toIPAddress": "10.0.0.1"}),
])
def test_bad_dicts_are_invalid_argument(conv: Any, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        conv(bad)


class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def update_interface(self, iface: types_pb2.Interface) -> types_pb2.Interface:
        self.calls.append(("UpdateInterface", iface.name))
        return iface

    async def update_routes(self, routes: list[types_pb2.Route]) -> list[types_pb2.Route]:
        self.calls.append(("UpdateRoutes", len(routes)))
        return routes

    async def add_arp_neighbors(self, neighbors: list[types_pb2.ARPNeighbor]) -> None:
        self.calls.append(("AddARPNeighbors", [n.toIPAddress.address for n in neighbors]))


def guest() -> tuple[GuestAgent, RecordingClient]:
    g = GuestAgent(AgentAddress("virtio-serial", path="/nonexistent/agent.sock"))
    rec = RecordingClient()
    g.client = rec  # type: ignore[assignment]
    return g, rec


async def test_configure_network_order() -> None:
    g, rec = guest()
    ep, ep2 = endpoint(), VethEndpoint(name="net1", mac="02:00:00:00:01:01", mtu=1500)
    await g.configure_network([ep.to_agent_interface("eth0"), ep2.to_agent_interface("eth1")],
                              ep.to_agent_routes("eth0") + ep2.to_agent_routes("eth1"),
                              ep.to_agent_neighbors("eth0"))
    assert rec.calls == [("UpdateInterface", "eth0"), ("UpdateInterface", "eth1"), ("UpdateRoutes", 5),
                         ("AddARPNeighbors", ["10.88.0.1", "fd00::1"])]


async def test_configure_network_without_neighbors_and_bad_input() -> None:
    g, rec = guest()
    await g.configure_network([endpoint().to_agent_interface("eth0")], [], [])
    assert rec.calls == [("UpdateInterface", "eth0"), ("UpdateRoutes", 0)]
    rec.calls.clear()
    with pytest.raises(InvalidArgument):
        await g.configure_network([endpoint().to_agent_interface("eth0")], [], [{"bogus": 1}])
    assert rec.calls == []
