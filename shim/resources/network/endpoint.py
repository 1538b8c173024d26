"""What CNI left in a pod netns, as plain data, and its kata-agent shaped dict form.

The dicts mirror kata's agent protocol (agent.proto / types.proto): ``Interface`` {device,
name, hwAddr, mtu, IPAddresses[{family, address, mask}]}, ``Route`` {dest, gateway, device,
source, scope, family} and ``ARPNeighbor`` {toIPAddress, device, lladdr, state, flags}.
``family`` uses kata's IPFamily enum values (v4 = 0, v6 = 1); ``mask`` is the prefix length as
a decimal string, as kata sends it. The agent-client side maps these dicts to protobuf.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument

IP_FAMILY_V4 = 0
IP_FAMILY_V6 = 1

NUD_PERMANENT = 0x80

# rtm_scope values (linux/rtnetlink.h)
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254


def _family_of(addr: str) -> int:
    try:
        return IP_FAMILY_V4 if ipaddress.ip_address(addr).version == 4 else IP_FAMILY_V6
    except ValueError:
        raise InvalidArgument(f"not an IP address: {addr!r}") from None


def _check_mac(mac: str) -> str:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts):
        raise InvalidArgument(f"not a MAC address: {mac!r}")
    return mac.lower()


@dataclass(frozen=True)
class IPAddr:
    """One interface address, ``address``/``prefixlen``."""

    address: str
    prefixlen: int

    def __post_init__(self) -> None:
        fam = _family_of(self.address)
        limit = 32 if fam == IP_FAMILY_V4 else 128
        if not 0 <= self.prefixlen <= limit:
            raise InvalidArgument(f"bad prefix length {self.prefixlen} for {self.address}")

    @property
    def family(self) -> int:
        return _family_of(self.address)

    def to_agent(self) -> dict[str, Any]:
        return {"family": self.family, "address": self.address, "mask": str(self.prefixlen)}


@dataclass(frozen=True)
class Route:
    """A main-table route via the endpoint. ``dest`` is CIDR, or "" for the default route."""

    dest: str
    gateway: str = ""
    source: str = ""
    scope: int = RT_SCOPE_UNIVERSE
    family: int = IP_FAMILY_V4

    def __post_init__(self) -> None:
        if self.dest:
            try:
                net = ipaddress.ip_network(self.dest, strict=False)
            except ValueError:
                raise InvalidArgument(f"bad route destination {self.dest!r}") from None
            want = IP_FAMILY_V4 if net.version == 4 else IP_FAMILY_V6
            if want != self.family:
                raise InvalidArgument(f"route {self.dest} does not match family {self.family}")
        for addr in (self.gateway, self.source):
            if addr and _family_of(addr) != self.family:
                raise InvalidArgument(f"route {self.dest or 'default'}: {addr} is not family {self.family}")

    @property
    def is_default(self) -> bool:
        return self.dest == ""

    def to_agent(self, device: str) -> dict[str, Any]:
        return {"dest": self.dest, "gateway": self.gateway, "device": device,
                "source": self.source, "scope": self.scope, "family": self.family}


def route_order(r: Route) -> tuple[bool, bool]:
    """Link routes first, then routes via a gateway, default routes last: the guest kernel
    refuses a gateway it cannot reach yet."""
    return (bool(r.gateway), r.is_default)


@dataclass(frozen=True)
class Neighbor:
    address: str
    lladdr: str
    state: int
    flags: int = 0

    def to_agent(self, device: str) -> dict[str, Any]:
        fam = _family_of(self.address)
        return {"toIPAddress": {"family": fam, "address": self.address,
                                "mask": "32" if fam == IP_FAMILY_V4 else "128"},
                "device": device, "lladdr": self.lladdr, "state": self.state,
                "flags": self.flags}


@dataclass(frozen=True)
class VethEndpoint:
    """The veth CNI put in the pod netns. The guest NIC takes its MAC, MTU, addresses, routes."""

    name: str
    mac: str
    mtu: int
    addrs: tuple[IPAddr, ...] = ()
    routes: tuple[Route, ...] = ()
    ifindex: int = 0
    neighbors: tuple[Neighbor, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 15 or "/" in self.name or " " in self.name:
            raise InvalidArgument(f"bad interface name {self.name!r}")
        object.__setattr__(self, "mac", _check_mac(self.mac))
        if not 68 <= self.mtu <= 65535:
            raise InvalidArgument(f"bad MTU {self.mtu} on {self.name}")

    def to_agent_interface(self, guest_name: str | None = None) -> dict[str, Any]:
        """kata agent ``Interface``; the guest device is named like the veth unless overridden."""
        dev = guest_name or self.name
        return {"device": dev, "name": dev, "hwAddr": self.mac, "mtu": self.mtu,
                "IPAddresses": [a.to_agent() for a in self.addrs]}

    def to_agent_routes(self, guest_name: str | None = None) -> list[dict[str, Any]]:
        """kata agent ``Route``s: link routes first, then routes via a gateway (the guest kernel
        refuses a gateway it cannot reach yet)."""
        dev = guest_name or self.name
        return [r.to_agent(dev) for r in sorted(self.routes, key=route_order)]

    def to_agent_neighbors(self, guest_name: str | None = None) -> list[dict[str, Any]]:
        """Static (PERMANENT) neighbours only, as kata does; learned ones are re-learned."""
        dev = guest_name or self.name
        return [n.to_agent(dev) for n in self.neighbors if n.state & NUD_PERMANENT]


def family_from_socket(af: int) -> int:
    if af == socket.AF_INET:
        return IP_FAMILY_V4
    if af == socket.AF_INET6:
        return IP_FAMILY_V6
    raise InvalidArgument(f"unsupported address family {af}")
