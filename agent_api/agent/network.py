"""Guest network configuration with the guest's ``ip`` (busybox or iproute2).

Parsing is line-based and tolerant: ``ip -o addr show`` for addresses, /sys/class/net for link
attributes, ``ip [-6] route show`` for routes. UpdateInterface finds the link by MAC (kata's
rule) or name; UpdateRoutes replaces all routes of non-loopback links.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Awaitable, Callable

from agent_api.agent.reaper import Reaper, RunResult, run
from proto.kata import agent_pb2, types_pb2
from shim.errors import Internal, InvalidArgument, NotFound

log = logging.getLogger(__name__)
SYS_NET = "/sys/class/net"
SCOPES = {"global": 0, "universe": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}
SCOPE_NAMES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
ARPHRD = {1: "ether", 772: "loopback", 65534: "none"}
Runner = Callable[[list[str]], Awaitable[RunResult]]


def parse_addrs(text: str) -> dict[str, list[types_pb2.IPAddress]]:
    """``ip -o addr show`` → {ifname: [IPAddress]}."""
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


def parse_routes(text: str, family: int) -> list[types_pb2.Route]:
    """``ip route show`` lines → Routes (unknown keywords are skipped)."""
    routes = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] in ("unreachable", "prohibit", "blackhole", "broadcast", "local"):
            continue
        r = types_pb2.Route(family=family)
        r.dest = "" if words[0] == "default" else words[0]
        i = 1
        while i < len(words):
            key = words[i]
            val = words[i + 1] if i + 1 < len(words) else ""
            if key == "via":
                r.gateway = val
            elif key == "dev":
                r.device = val
            elif key == "src":
                r.source = val
            elif key == "scope":
                r.scope = SCOPES.get(val, int(val) if val.isdigit() else 0)
            elif key in ("proto", "metric", "table", "mtu", "pref", "expires", "realm", "weight"):
                pass
            else:
                i += 1
                continue
            i += 2
        routes.append(r)
    return routes


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


def check_interface(iface: types_pb2.Interface) -> None:
    if iface.name and not IFNAME_RE.match(iface.name):
        raise InvalidArgument(f"invalid interface name {iface.name!r}")
    if iface.hwAddr and not MAC_RE.match(iface.hwAddr):
        raise InvalidArgument(f"invalid MAC {iface.hwAddr!r}")
    if not iface.name and not iface.hwAddr:
        raise InvalidArgument("interface needs a name or a hwAddr")
    if iface.mtu > 65535:
        raise InvalidArgument(f"invalid mtu {iface.mtu}")
    for a in iface.IPAddresses:
        check_address(a.address, a.mask)


def check_address(addr: str, mask: str) -> str:
    try:
        return str(ipaddress.ip_interface(f"{addr}/{mask}" if mask else addr))
    except ValueError as exc:
        raise InvalidArgument(f"invalid address {addr}/{mask}: {exc}") from None


def check_route(r: types_pb2.Route) -> None:
    if r.dest:
        try:
            ipaddress.ip_network(r.dest, strict=False)
        except ValueError:
            raise InvalidArgument(f"invalid route destination {r.dest!r}") from None
    for value in (r.gateway, r.source):
        if value:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise InvalidArgument(f"invalid route address {value!r}") from None
    if r.device and not IFNAME_RE.match(r.device):
        raise InvalidArgument(f"invalid route device {r.device!r}")


def route_argv(r: types_pb2.Route) -> list[str]:
    argv = ["ip"] + (["-6"] if r.family == types_pb2.v6 else []) + ["route", "add"]
    argv.append(r.dest or "default")
    if r.gateway:
        argv += ["via", r.gateway]
    if r.device:
        argv += ["dev", r.device]
    if r.source:
        argv += ["src", r.source]
    if r.scope:
        argv += ["scope", SCOPE_NAMES.get(r.scope, str(r.scope))]
    return argv


class Network:
    def __init__(self, reaper: Reaper, *, sys_net: str = SYS_NET, runner: Runner | None = None) -> None:
        self.sys_net = sys_net
        self._runner = runner or (lambda argv: run(reaper, argv, timeout=30))

    async def _ip(self, *args: str) -> str:
        result = await self._runner(["ip", *args])
        if result.code != 0:
            msg = result.stderr.decode("utf-8", "replace").strip()
            raise Internal(f"ip {' '.join(args)}: {msg or result.code}")
        return result.stdout.decode("utf-8", "replace")

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

    async def list_routes(self) -> agent_pb2.Routes:
        out = agent_pb2.Routes()
        out.Routes.extend(parse_routes(await self._ip("route", "show"), types_pb2.v4))
        try:
            out.Routes.extend(parse_routes(await self._ip("-6", "route", "show"), types_pb2.v6))
        except Internal as exc:  # no IPv6 in this kernel
            log.debug("ipv6 routes: %s", exc)
        return out

    def _find_link(self, iface: types_pb2.Interface) -> str:
        names = link_names(self.sys_net)
        if iface.hwAddr:
            for name in names:
                if _sys(name, "address", self.sys_net).lower() == iface.hwAddr.lower():
                    return name
        if iface.name in names:
            return iface.name
        raise NotFound(f"no link with MAC {iface.hwAddr!r} or name {iface.name!r}")

    async def update_interface(self, iface: types_pb2.Interface) -> types_pb2.Interface:
        check_interface(iface)
        name = self._find_link(iface)
        await self._ip("link", "set", "dev", name, "down")
        if iface.name and iface.name != name:
            await self._ip("link", "set", "dev", name, "name", iface.name)
            name = iface.name
        if iface.mtu:
            await self._ip("link", "set", "dev", name, "mtu", str(iface.mtu))
        await self._ip("addr", "flush", "dev", name)
        for a in iface.IPAddresses:
            await self._ip("addr", "add", check_address(a.address, a.mask), "dev", name)
        await self._ip("link", "set", "dev", name, "up")
        for listed in (await self.list_interfaces()).Interfaces:
            if listed.name == name:
                return listed
        raise Internal(f"link {name} vanished")

    async def update_routes(self, routes: agent_pb2.Routes) -> agent_pb2.Routes:
        for r in routes.Routes:
            check_route(r)
        current = await self.list_routes()
        for r in current.Routes:
            if r.device and r.device != "lo" and not r.dest.startswith("fe80:"):
                fam = ["-6"] if r.family == types_pb2.v6 else []
                try:
                    await self._ip(*fam, "route", "del", r.dest or "default", "dev", r.device)
                except Internal as exc:
                    log.debug("route del: %s", exc)
        # link-scope routes first so that gateways are reachable
        for r in sorted(routes.Routes, key=lambda r: bool(r.gateway)):
            argv = route_argv(r)
            await self._ip(*argv[1:])
        return await self.list_routes()
