"""Guest network configuration: kata's UpdateInterface / UpdateRoutes / AddARPNeighbors /
ListInterfaces / ListRoutes.

Links and addresses go through the guest's ``ip`` (busybox in the image, iproute2 on a host; only
the commands and the ``ip -o addr show`` format both share are used) and /sys/class/net. Routes
and neighbours go through rtnetlink (:mod:`agent_api.agent.netlink`): busybox ``ip`` cannot add a
neighbour and does not print a route's protocol.

Semantics follow kata's agent:

* UpdateInterface finds the link by MAC (by name only when no MAC is given; with a
  ``devicePath`` — a NIC the host hot-plugged — it waits up to :data:`HOTPLUG_WAIT` seconds for
  the guest kernel to create it), brings it down,
  renames it (e.g. to eth0), replaces all its addresses (v4 and v6), sets MTU and ARP, brings it
  up.
* UpdateRoutes replaces the main-table routes of every non-loopback link: routes the kernel made
  (``proto kernel``, e.g. an address's subnet route) stay; all others are deleted; the requested
  ones are then added link routes first, then routes via a gateway, default routes last, each
  as create-or-replace, so calling it again with the same (or other) routes just works.
* AddARPNeighbors creates or replaces each neighbour (state 0 means PERMANENT).

All input is validated before anything is changed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

from agent_api.agent import netlink
from agent_api.agent.netlink import RouteEntry
from agent_api.agent.reaper import Reaper, RunResult, run
from common.errors import AlreadyExists, Internal, InvalidArgument, KataColoError, NotFound
from proto.kata import agent_pb2, types_pb2

log = logging.getLogger(__name__)
SYS_NET = "/sys/class/net"
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
ARPHRD = {1: "ether", 772: "loopback", 65534: "none"}
IFF_NOARP = 0x80
FAMILIES = {types_pb2.v4: socket.AF_INET, types_pb2.v6: socket.AF_INET6}
HOTPLUG_WAIT = 20.0
HOTPLUG_POLL = 0.02
Runner = Callable[[list[str]], Awaitable[RunResult]]


class RouteNetlink(Protocol):
    """What Network needs from :class:`agent_api.agent.netlink.Rtnl` (tests pass a fake)."""

    def __enter__(self) -> RouteNetlink: ...
    def __exit__(self, *exc: object) -> None: ...
    def routes(self, family: int) -> list[RouteEntry]: ...
    def replace_route(self, route: RouteEntry, what: str) -> None: ...
    def delete_route(self, route: RouteEntry, what: str) -> None: ...
    def replace_neighbor(self, ifindex: int, dst: str, lladdr: bytes, state: int, flags: int,
                         what: str) -> None: ...
    def index(self, name: str) -> int: ...
    def name(self, index: int) -> str: ...


def parse_addrs(text: str) -> dict[str, list[types_pb2.IPAddress]]:
    """``ip -o addr show`` (iproute2 or busybox) → {ifname: [IPAddress]}."""
    out: dict[str, list[types_pb2.IPAddress]] = {}
    for line in text.splitlines():
        words = line.replace("\\", " ").split()
        if len(words) < 4 or not words[0].rstrip(":").isdigit():
            continue
        name = words[1].rstrip(":").split("@")[0]
        if words[2] not in ("inet", "inet6"):
            continue
        addr, _, mask = words[3].partition("/")
        family = types_pb2.v6 if words[2] == "inet6" else types_pb2.v4
        if not mask:
            mask = "128" if family == types_pb2.v6 else "32"
        out.setdefault(name, []).append(types_pb2.IPAddress(family=family, address=addr, mask=mask))
    return out


def _sys(name: str, attr: str, root: str = SYS_NET) -> str:
    try:
        with open(os.path.join(root, name, attr)) as f:
            return f.read().strip()
    except OSError:
        return ""


def link_names(root: str = SYS_NET) -> list[str]:
    try:
        return sorted(os.listdir(root))
    except OSError:
        return []


def _ifname(value: str, what: str) -> str:
    if not IFNAME_RE.match(value) or value in (".", ".."):
        raise InvalidArgument(f"invalid {what} {value[:64]!r}")
    return value


def check_address(addr: str, mask: str) -> str:
    """``addr``/``mask`` (prefix length) as CIDR text; InvalidArgument if it is not one."""
    try:
        return str(ipaddress.ip_interface(f"{addr}/{mask}" if mask else addr))
    except ValueError as exc:
        raise InvalidArgument(f"invalid address {addr}/{mask}: {exc}") from None


def check_interface(iface: types_pb2.Interface) -> None:
    if iface.name:
        _ifname(iface.name, "interface name")
    if iface.hwAddr and not MAC_RE.match(iface.hwAddr):
        raise InvalidArgument(f"invalid MAC {iface.hwAddr!r}")
    if not iface.name and not iface.hwAddr:
        raise InvalidArgument("interface needs a name or a hwAddr")
    if iface.mtu and not 68 <= iface.mtu <= 65535:
        raise InvalidArgument(f"invalid mtu {iface.mtu}")
    for a in iface.IPAddresses:
        check_address(a.address, a.mask)


def addr_argv(cidr: str, dev: str) -> list[str]:
    """``ip addr add``; IPv4 gets the subnet broadcast (as CNI's netlink library sets it)."""
    argv = ["addr", "add", cidr]
    iface = ipaddress.ip_interface(cidr)
    if iface.version == 4 and iface.network.prefixlen < 31:
        argv += ["brd", "+"]
    return argv + ["dev", dev]


def _ip_of(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {value[:64]!r}") from None


def route_entry(r: types_pb2.Route, index: Callable[[str], int]) -> RouteEntry:
    """Validate a kata Route and turn it into the netlink route to create. The family comes from
    the addresses (``family`` is only used when there is none); ``index`` maps a device name
    to its ifindex (NotFound when absent)."""
    versions: set[int] = set()
    dst, dst_len = "", 0
    if r.dest and r.dest != "default":
        try:
            net = ipaddress.ip_network(r.dest, strict=False)
        except ValueError:
            raise InvalidArgument(f"invalid route destination {r.dest[:64]!r}") from None
        dst, dst_len = str(net.network_address), net.prefixlen
        versions.add(net.version)
        if dst_len == 0:
            dst = ""
    gateway = _ip_of(r.gateway, "route gateway") if r.gateway else None
    source = _ip_of(r.source, "route source") if r.source else None
    versions |= {a.version for a in (gateway, source) if a is not None}
    if len(versions) > 1:
        raise InvalidArgument(f"route {r.dest or 'default'} mixes IPv4 and IPv6 addresses")
    if versions:
        family = socket.AF_INET if versions.pop() == 4 else socket.AF_INET6
    elif r.family in FAMILIES:
        family = FAMILIES[r.family]
    else:
        raise InvalidArgument(f"invalid route family {r.family}")
    if not r.device and gateway is None:
        raise InvalidArgument(f"route {r.dest or 'default'} needs a device or a gateway")
    if r.scope > 255:
        raise InvalidArgument(f"invalid route scope {r.scope}")
    oif = index(_ifname(r.device, "route device")) if r.device else 0
    scope = r.scope
    if not scope and gateway is None and family == socket.AF_INET:
        scope = netlink.RT_SCOPE_LINK  # as `ip route add` does for a route without a gateway
    return RouteEntry(family=family, dst=dst, dst_len=dst_len, gateway=str(gateway or ""), oif=oif,
                      prefsrc=str(source or ""), scope=scope, flags=r.flags & netlink.RTNH_F_ONLINK)


def route_pb(e: RouteEntry, name: Callable[[int], str]) -> types_pb2.Route:
    return types_pb2.Route(
        dest=f"{e.dst}/{e.dst_len}" if e.dst_len else "", gateway=e.gateway, device=name(e.oif),
        source=e.prefsrc, scope=e.scope, flags=e.flags & netlink.RTNH_F_ONLINK,
        family=types_pb2.v6 if e.family == socket.AF_INET6 else types_pb2.v4)


def describe(e: RouteEntry, name: Callable[[int], str]) -> str:
    """``ip route`` style one-liner for error messages."""
    text = f"{e.dst}/{e.dst_len}" if e.dst_len else "default"
    if e.gateway:
        text += f" via {e.gateway}"
    return text + (f" dev {name(e.oif) or e.oif}" if e.oif else "")


def route_order(e: RouteEntry) -> tuple[bool, bool]:
    """Link routes first (they make gateways reachable), then via-gateway, default last."""
    return (bool(e.gateway), e.is_default)


def is_main_unicast(e: RouteEntry) -> bool:
    return e.table == netlink.RT_TABLE_MAIN and e.type == netlink.RTN_UNICAST and e.oif != 0


def check_neighbor(n: types_pb2.ARPNeighbor) -> tuple[str, str, bytes, int, int]:
    """(device, ip, lladdr bytes, NUD state, flags) of a kata ARPNeighbor, or InvalidArgument."""
    if not n.HasField("toIPAddress") or not n.toIPAddress.address:
        raise InvalidArgument("ARP neighbor without toIPAddress")
    ip = _ip_of(n.toIPAddress.address, "neighbor address")
    if n.toIPAddress.family == types_pb2.v6 and ip.version == 4:
        raise InvalidArgument(f"neighbor {ip} is not an IPv6 address")
    if not n.device:
        raise InvalidArgument(f"neighbor {ip} without a device")
    _ifname(n.device, "neighbor device")
    if n.lladdr and not MAC_RE.match(n.lladdr):
        raise InvalidArgument(f"invalid neighbor lladdr {n.lladdr[:64]!r}")
    if not 0 <= n.state <= 0xFF or not 0 <= n.flags <= 0xFF:
        raise InvalidArgument(f"invalid neighbor state/flags {n.state}/{n.flags}")
    lladdr = bytes.fromhex(n.lladdr.replace(":", "")) if n.lladdr else b""
    return n.device, str(ip), lladdr, n.state or netlink.NUD_PERMANENT, n.flags


class Network:
    def __init__(self, reaper: Reaper | None, *, sys_net: str = SYS_NET, runner: Runner | None = None,
                 rtnl: Callable[[], RouteNetlink] = netlink.Rtnl) -> None:
        self.sys_net = sys_net
        self._reaper = reaper
        self._runner: Runner = runner or self._run
        self._rtnl = rtnl

    async def _run(self, argv: list[str]) -> RunResult:
        if self._reaper is None:
            raise Internal("Network has neither a reaper nor a runner")
        return await run(self._reaper, argv, timeout=30)

    async def _ip(self, *args: str) -> str:
        result = await self._runner(["ip", *args])
        if result.code != 0:
            msg = result.stderr.decode("utf-8", "replace").strip()
            raise Internal(f"ip {' '.join(args)}: {msg or result.code}")
        return result.stdout.decode("utf-8", "replace")

    # -- interfaces ---------------------------------------------------------------------------
    async def list_interfaces(self) -> agent_pb2.Interfaces:
        addrs = parse_addrs(await self._ip("-o", "addr", "show"))
        out = agent_pb2.Interfaces()
        for name in link_names(self.sys_net):
            iface = out.Interfaces.add(name=name, device=name)
            iface.hwAddr = _sys(name, "address", self.sys_net)
            mtu = _sys(name, "mtu", self.sys_net)
            iface.mtu = int(mtu) if mtu.isdigit() else 0
            flags = _sys(name, "flags", self.sys_net)
            iface.raw_flags = int(flags, 16) if flags else 0
            kind = _sys(name, "type", self.sys_net)
            iface.type = ARPHRD.get(int(kind), kind) if kind.isdigit() else ""
            iface.IPAddresses.extend(addrs.get(name, []))
        return out

    def _find_link(self, iface: types_pb2.Interface) -> str:
        """kata's rule: the MAC identifies the link; the name only when no MAC is given."""
        names = link_names(self.sys_net)
        if iface.hwAddr:
            for name in names:
                if _sys(name, "address", self.sys_net).lower() == iface.hwAddr.lower():
                    return name
            raise NotFound(f"no link with MAC {iface.hwAddr}")
        if iface.name in names:
            return iface.name
        raise NotFound(f"no link named {iface.name!r}")

    async def _wait_link(self, iface: types_pb2.Interface) -> str:
        """A hot-plugged NIC appears once the guest's PCIe hotplug and virtio-net probe ran."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HOTPLUG_WAIT
        while True:
            try:
                return self._find_link(iface)
            except NotFound:
                if loop.time() > deadline:
                    raise NotFound(f"no link with MAC {iface.hwAddr} (PCI {iface.devicePath[:32]}) "
                                   f"after {HOTPLUG_WAIT:.0f}s") from None
            await asyncio.sleep(HOTPLUG_POLL)

    async def update_interface(self, iface: types_pb2.Interface) -> types_pb2.Interface:
        check_interface(iface)
        cidrs = [check_address(a.address, a.mask) for a in iface.IPAddresses]
        name = await self._wait_link(iface) if iface.devicePath else self._find_link(iface)
        new_name = iface.name or name
        if new_name != name and new_name in link_names(self.sys_net):
            raise AlreadyExists(f"cannot rename {name} to {new_name}: another link has that name")
        await self._ip("link", "set", "dev", name, "down")
        if new_name != name:
            await self._ip("link", "set", "dev", name, "name", new_name)
            name = new_name
        await self._ip("addr", "flush", "dev", name)
        for cidr in cidrs:
            await self._ip(*addr_argv(cidr, name))
        mtu = ["mtu", str(iface.mtu)] if iface.mtu else []
        arp = "off" if iface.raw_flags & IFF_NOARP else "on"
        await self._ip("link", "set", "dev", name, *mtu, "arp", arp, "up")
        for listed in (await self.list_interfaces()).Interfaces:
            if listed.name == name:
                return listed
        raise Internal(f"link {name} vanished")

    # -- routes -------------------------------------------------------------------------------
    def _dump(self, nl: RouteNetlink) -> list[RouteEntry]:
        current = nl.routes(socket.AF_INET)
        try:
            current += nl.routes(socket.AF_INET6)
        except KataColoError as exc:  # a kernel without IPv6
            log.debug("ipv6 routes: %s", exc)
        return [e for e in current if is_main_unicast(e)]

    async def list_routes(self) -> agent_pb2.Routes:
        with self._rtnl() as nl:
            return agent_pb2.Routes(Routes=[route_pb(e, nl.name) for e in self._dump(nl)])

    async def update_routes(self, routes: agent_pb2.Routes) -> agent_pb2.Routes:
        with self._rtnl() as nl:
            wanted = sorted((route_entry(r, nl.index) for r in routes.Routes), key=route_order)
            kept: set[tuple[int, str, int, str, int]] = set()
            for e in self._dump(nl):
                if e.protocol == netlink.RTPROT_KERNEL or nl.name(e.oif) in ("lo", ""):
                    kept.add(e.key())
                    continue
                try:
                    nl.delete_route(e, f"delete route {describe(e, nl.name)}")
                except NotFound:
                    pass  # went away with its link or address meanwhile
            for e in wanted:
                if e.key() in kept:  # e.g. the subnet route of an address: the kernel's stays
                    continue
                nl.replace_route(e, f"add route {describe(e, nl.name)}")
        return await self.list_routes()

    # -- neighbours ---------------------------------------------------------------------------
    async def add_arp_neighbors(self, neighbors: agent_pb2.ARPNeighbors) -> None:
        checked = [check_neighbor(n) for n in neighbors.ARPNeighbors]
        with self._rtnl() as nl:
            indexes = [nl.index(dev) for dev, *_ in checked]  # all devices exist before any change
            for index, (dev, ip, lladdr, state, flags) in zip(indexes, checked):
                nl.replace_neighbor(index, ip, lladdr, state, flags, f"add neighbor {ip} dev {dev}")
