"""TcFilterState / TcFilterNetwork JSON round trips and crash-cleanup semantics."""
from __future__ import annotations

import json

import pytest

from common.errors import InvalidArgument, NotFound
from shim.resources.network import state as st
from shim.resources.network.state import TcFilterState
from shim.resources.network.tcfilter import TcFilterNetwork


def sample() -> TcFilterState:
    s = TcFilterState(netns="/var/run/netns/cni-1", veth_name="eth0", tap_name="tap0_kata",
                      queues=2, mtu=1450, guest_mac="02:00:00:00:00:01")
    for step in (st.TAP, st.QDISC_VETH, st.FILTER_VETH):
        s.mark(step)
    return s


def test_state_round_trip() -> None:
    s = sample()
    back = TcFilterState.from_json(s.to_json())
    assert back == s
    assert back.created == [st.TAP, st.QDISC_VETH, st.FILTER_VETH]


def test_state_mark_unmark() -> None:
    s = sample()
    s.mark(st.TAP)
    assert s.created.count(st.TAP) == 1
    s.unmark(st.QDISC_VETH)
    assert not s.has(st.QDISC_VETH)
    with pytest.raises(InvalidArgument):
        s.mark("bogus")


@pytest.mark.parametrize("text", [
    "not json", "[]", json.dumps({"version": 99}),
    json.dumps({**sample().to_dict(), "queues": "many"}),
    json.dumps({**sample().to_dict(), "created": ["tap", "bogus"]}),
    json.dumps({k: v for k, v in sample().to_dict().items() if k != "tap_name"}),
])
def test_state_bad_json(text: str) -> None:
    with pytest.raises(InvalidArgument):
        TcFilterState.from_json(text)


def test_network_round_trip_and_vanished_netns_detach() -> None:
    net = TcFilterNetwork.from_json(json.dumps({
        "netns": "/var/run/netns/kc-test-gone-0b7e", "vnet_hdr": False,
        "attachments": [sample().to_dict()]}))
    assert net.attachments[0].created and net.vnet_hdr is False
    again = TcFilterNetwork.from_json(net.to_json())
    assert again.to_json() == net.to_json()
    # the state names a netns that no longer exists: the kernel removed everything with it
    net.attachments[0].netns = "/var/run/netns/kc-test-gone-0b7e"
    net.detach()
    assert net.attachments == []
    net.detach()  # idempotent


def test_network_bad_json() -> None:
    with pytest.raises(InvalidArgument):
        TcFilterNetwork.from_json('{"netns": 1}')
    with pytest.raises(InvalidArgument):
        TcFilterNetwork.from_json("{")


def test_network_rejects_missing_netns_and_bad_queues() -> None:
    with pytest.raises(NotFound):
        TcFilterNetwork("/var/run/netns/kc-test-does-not-exist-41c2")
    with pytest.raises(InvalidArgument):
        TcFilterNetwork("relative/path")
    from shim.resources.network.endpoint import VethEndpoint

    net = TcFilterNetwork("/proc/self/ns/net", backend="pyroute2")
    with pytest.raises(InvalidArgument):
        net.attach(VethEndpoint("eth0", "02:00:00:00:00:01", 1500), queues=0)
