"""Scan a pod netns for the veth(s) CNI created and read them into VethEndpoints (pyroute2)."""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from common.errors import ResourceError
from shim.resources.network.endpoint import (
    IPAddr,
    Neighbor,
    Route,
    VethEndpoint,
    family_from_socket,
)
from shim.resources.network.netns import run_in_netns

ENDPOINT_KINDS = frozenset({"veth"})
MAIN_TABLE = 254
RTN_UNICAST = 1
_V6_SKIP = (ipaddress.ip_network("fe80::/10"), ipaddress.ip_network("ff00::/8"))


def _link_kind(msg: Any) -> str:
    return msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""


def _skip_v6(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.version == 6 and any(ip in net for net in _V6_SKIP)


def _addrs(msgs: Iterable[Any]) -> tuple[IPAddr, ...]:
    out: list[IPAddr] = []
    for m in msgs:
        if m["family"] not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
        if not addr or _skip_v6(addr):
            continue
        out.append(IPAddr(addr, int(m["prefixlen"])))
    return tuple(out)


def _routes(msgs: Iterable[Any], ifindex: int) -> tuple[Route, ...]:
    out: list[Route] = []
    for m in msgs:
        table = m.get("RTA_TABLE") or m["table"]
        if table != MAIN_TABLE or m["type"] != RTN_UNICAST or m.get("RTA_OIF") != ifindex:
            continue
        dst = m.get("RTA_DST")
        dest = f"{dst}/{m['dst_len']}" if dst else ""
        if dst and _skip_v6(dst):
            continue
        out.append(Route(dest=dest, gateway=m.get("RTA_GATEWAY") or "",
                         source=m.get("RTA_PREFSRC") or "", scope=int(m["scope"]),
                         family=family_from_socket(m["family"])))
    return tuple(out)


def _neighbors(msgs: Iterable[Any]) -> tuple[Neighbor, ...]:
    out: list[Neighbor] = []
    for m in msgs:
        dst, lladdr = m.get("NDA_DST"), m.get("NDA_LLADDR")
        if m["family"] not in (socket.AF_INET, socket.AF_INET6) or not dst or not lladdr:
            continue
        out.append(Neighbor(dst, lladdr, int(m["state"]), int(m["flags"])))
    return tuple(out)


def _scan_here() -> list[VethEndpoint]:
    from pyroute2 import IPRoute  # imported by scan_netns (in this thread's original netns)

    endpoints: list[VethEndpoint] = []
    with IPRoute(groups=0) as ipr:
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME")
            if name == "lo" or _link_kind(link) not in ENDPOINT_KINDS:
                continue
            idx = int(link["index"])
            endpoints.append(VethEndpoint(
                name=name,
                mac=link.get("IFLA_ADDRESS"),
                mtu=int(link.get("IFLA_MTU")),
                ifindex=idx,
                addrs=_addrs(ipr.get_addr(index=idx)),
                routes=(_routes(ipr.get_routes(family=socket.AF_INET), idx)
                        + _routes(ipr.get_routes(family=socket.AF_INET6), idx)),
                neighbors=_neighbors(ipr.get_neighbours(ifindex=idx)),
            ))
    return sorted(endpoints, key=lambda e: e.name)


def scan_netns(netns_path: str) -> list[VethEndpoint]:
    """The veth endpoints in *netns_path* (lo, taps and other kinds skipped), sorted by name.

    NotFound / InvalidArgument for a bad path, ResourceError if netlink fails.
    """
    # pyroute2 costs ~0.1 s to import: only sandboxes with a network namespace pay it
    from pyroute2 import IPRoute  # noqa: F401 - loaded here, outside the netns thread
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return run_in_netns(netns_path, _scan_here)
    except NetlinkError as exc:
        raise ResourceError(f"scan {netns_path}: netlink error {exc.code}: {exc}") from None
    except OSError as exc:
        raise ResourceError(f"scan {netns_path}: {exc}") from None
