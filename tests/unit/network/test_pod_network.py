"""The sandbox-facing pod-network helpers that need no netns."""
from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from shim.resources.network import pod
from shim.resources.network.endpoint import IPAddr, Route, VethEndpoint
from shim.resources.network.tap import MAX_QUEUES


def test_netns_from_spec() -> None:
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}}
    assert pod.netns_from_spec(spec) == "/var/run/netns/cni-1"
    assert pod.netns_from_spec({"linux": {"namespaces": [{"type": "network"}]}}) == ""
    assert pod.netns_from_spec({}) == ""
    with pytest.raises(InvalidArgument):
        pod.netns_from_spec({"linux": {"namespaces": [{"type": "network", "path": 7}]}})
    with pytest.raises(InvalidArgument):
        pod.netns_from_spec({"linux": []})


def test_queues() -> None:
    assert pod.queues_for(1) == 1 and pod.queues_for(4) == 4
    assert pod.queues_for(0) == 1 and pod.queues_for(1000) == MAX_QUEUES


def test_guest_config_orders_gateways_last_across_endpoints() -> None:
    a = VethEndpoint("eth0", "02:00:00:00:00:01", 1500, addrs=(IPAddr("10.0.0.2", 24),),
                     routes=(Route("", gateway="10.0.0.1"), Route("10.0.0.0/24", scope=253)))
    b = VethEndpoint("eth1", "02:00:00:00:00:02", 9000, addrs=(IPAddr("10.1.0.2", 24),),
                     routes=(Route("10.9.0.0/16", gateway="10.1.0.1"), Route("10.1.0.0/24", scope=253)))
    p = pod.PodNetwork.__new__(pod.PodNetwork)
    p.endpoints = [a, b]
    interfaces, routes, neighbors = p.guest_config()
    assert [i["name"] for i in interfaces] == ["eth0", "eth1"]
    assert [(r["dest"], r["gateway"]) for r in routes] == [
        ("10.0.0.0/24", ""), ("10.1.0.0/24", ""), ("10.9.0.0/16", "10.1.0.1"), ("", "10.0.0.1")]
    assert neighbors == []
