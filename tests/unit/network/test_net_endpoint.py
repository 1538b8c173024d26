"""VethEndpoint -> kata agent Interface / Route / ARPNeighbor dicts."""
from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from shim.resources.network.endpoint import (
    NUD_PERMANENT,
    RT_SCOPE_LINK,
    IPAddr,
    Neighbor,
    Route,
    VethEndpoint,
)


def endpoint() -> VethEndpoint:
    return VethEndpoint(
        name="eth0", mac="02:AA:bb:cc:dd:01", mtu=1450, ifindex=3,
        addrs=(IPAddr("10.88.0.5", 16), IPAddr("fd00::5", 64)),
        routes=(Route(dest="", gateway="10.88.0.1"),
                Route(dest="10.88.0.0/16", source="10.88.0.5", scope=RT_SCOPE_LINK),
                Route(dest="", gateway="fd00::1", family=1),
                Route(dest="192.168.7.0/24", gateway="10.88.0.254")),
        neighbors=(Neighbor("10.88.0.1", "02:00:00:00:00:01", NUD_PERMANENT),
                   Neighbor("10.88.0.9", "02:00:00:00:00:09", 0x02)),
    )


def test_agent_interface_shape() -> None:
    assert endpoint().to_agent_interface() == {
        "device": "eth0", "name": "eth0", "hwAddr": "02:aa:bb:cc:dd:01", "mtu": 1450,
        "IPAddresses": [{"family": 0, "address": "10.88.0.5", "mask": "16"},
                        {"family": 1, "address": "fd00::5", "mask": "64"}],
    }


def test_agent_interface_guest_name_override() -> None:
    d = endpoint().to_agent_interface(guest_name="eth1")
    assert d["device"] == d["name"] == "eth1"


def test_agent_routes_link_routes_before_gateway_routes_default_last() -> None:
    routes = endpoint().to_agent_routes()
    assert routes[0] == {"dest": "10.88.0.0/16", "gateway": "", "device": "eth0",
                         "source": "10.88.0.5", "scope": RT_SCOPE_LINK, "family": 0}
    assert [r["dest"] for r in routes[1:]] == ["192.168.7.0/24", "", ""]
    assert [r["gateway"] for r in routes[2:]] == ["10.88.0.1", "fd00::1"]
    assert all(r["device"] == "eth0" for r in routes)


def test_agent_neighbors_only_permanent() -> None:
    assert endpoint().to_agent_neighbors() == [{
        "toIPAddress": {"family": 0, "address": "10.88.0.1", "mask": "32"},
        "device": "eth0", "lladdr": "02:00:00:00:00:01", "state": NUD_PERMANENT, "flags": 0}]


@pytest.mark.parametrize("kwargs", [
    {"name": "", "mac": "02:00:00:00:00:01", "mtu": 1500},
    {"name": "a" * 16, "mac": "02:00:00:00:00:01", "mtu": 1500},
    {"name": "eth0", "mac": "02:00:00:00:00", "mtu": 1500},
    {"name": "eth0", "mac": "zz:00:00:00:00:01", "mtu": 1500},
    {"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 10},
])
def test_bad_endpoint_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        VethEndpoint(**kwargs)  # type: ignore[arg-type]


def test_bad_addresses_and_routes_rejected() -> None:
    with pytest.raises(InvalidArgument):
        IPAddr("10.0.0.300", 24)
    with pytest.raises(InvalidArgument):
        IPAddr("10.0.0.1", 33)
    with pytest.raises(InvalidArgument):
        Route(dest="fd00::/64", family=0)
    with pytest.raises(InvalidArgument):
        Route(dest="", gateway="fd00::1", family=0)
