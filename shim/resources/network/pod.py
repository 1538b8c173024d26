"""One sandbox's pod network, as the sandbox uses it.

The pod's netns comes from the sandbox container's OCI spec (``linux.namespaces`` entry of type
``network`` with a ``path``: CRI's ``/var/run/netns/cni-…``, or ``ctr run --with-ns``). Every
veth CNI left there is wired to a tap (:class:`TcFilterNetwork`); the taps become the VM's
virtio-net NICs (same MAC as the veth) and the guest gets the veths' addresses, routes and
static neighbours through the agent. A spec without a netns path (plain ``ctr run``) means
no pod network: the guest has only ``lo``.

Blocking (netlink, a few ms): call :meth:`PodNetwork.setup` / :meth:`teardown` through
``asyncio.to_thread``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument, ResourceError
from hypervisor.base import NetDevice
from shim.resources.network.endpoint import VethEndpoint, route_order
from shim.resources.network.scan import scan_netns
from shim.resources.network.tap import MAX_QUEUES
from shim.resources.network.tcfilter import BackendName, TapAttachment, TcFilterNetwork


def netns_from_spec(spec: dict[str, Any]) -> str:
    """The network namespace path of an OCI spec, or "" when it has none (runc would create a
    fresh empty one; the VM then gets no NIC)."""
    linux = spec.get("linux", {})
    if not isinstance(linux, dict):
        raise InvalidArgument("invalid OCI spec: linux must be an object")
    for ns in linux.get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path") or ""
            if not isinstance(path, str):
                raise InvalidArgument("invalid OCI spec: network namespace path must be a string")
            return path
    return ""


def queues_for(vcpus: int) -> int:
    """One tap queue per vCPU (virtio-net multiqueue), within the tap's limit."""
    return max(1, min(vcpus, MAX_QUEUES))


@dataclass
class PodNetwork:
    netns: str
    endpoints: list[VethEndpoint]
    net: TcFilterNetwork
    taps: list[TapAttachment] = field(default_factory=list)

    @classmethod
    def setup(cls, netns: str, queues: int = 1, backend: BackendName = "auto",
              on_change: Callable[[], None] | None = None) -> PodNetwork:
        """Scan *netns* and wire each veth to a tap. On failure nothing is left behind.
        ``on_change`` runs before each tap is made and after each change (write-ahead)."""
        return cls.wire(TcFilterNetwork(netns, backend, on_change=on_change), queues)

    @classmethod
    def wire(cls, net: TcFilterNetwork, queues: int = 1) -> PodNetwork:
        """Like :meth:`setup` with a TcFilterNetwork the caller already holds (and journals)."""
        endpoints = scan_netns(net.netns_path)
        pod = cls(net.netns_path, endpoints, net)
        try:
            for ep in endpoints:
                pod.taps.append(pod.net.attach(ep, queues))
        except BaseException:
            pod.teardown()
            raise
        return pod

    def nics(self, vhost: bool = False) -> tuple[NetDevice, ...]:
        """The NICs for the hypervisor; valid until :meth:`close_fds`."""
        return tuple(NetDevice(id=f"net{i}", mac=tap.guest_mac, tap_fds=tuple(tap.fds), vhost=vhost)
                     for i, tap in enumerate(self.taps))

    def close_fds(self) -> None:
        """Close the shim's copies of the tap fds (once the hypervisor holds its own)."""
        for tap in self.taps:
            tap.close_fds()

    def guest_config(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """kata agent (interfaces, routes, neighbours); guest links are named like the veths."""
        interfaces = [ep.to_agent_interface() for ep in self.endpoints]
        # ordered across all endpoints too: a gateway must be reachable when it is added
        pairs = sorted(((ep, r) for ep in self.endpoints for r in ep.routes), key=lambda p: route_order(p[1]))
        routes = [r.to_agent(ep.name) for ep, r in pairs]
        neighbors = [n for ep in self.endpoints for n in ep.to_agent_neighbors()]
        return interfaces, routes, neighbors

    def teardown(self) -> None:
        """Close fds and remove every tap, qdisc and filter this pod added (idempotent)."""
        self.close_fds()
        self.taps.clear()
        self.net.detach()

    def to_json(self) -> str:
        return self.net.to_json()

    @staticmethod
    def cleanup_json(text: str) -> None:
        """Undo a persisted pod network after a shim crash (netns already gone = nothing to do)."""
        try:
            TcFilterNetwork.from_json(text).detach()
        except OSError as exc:
            raise ResourceError(f"pod network cleanup: {exc}") from None

