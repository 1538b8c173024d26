"""Guest-side helpers against fake sysfs/procfs trees, a fake ``ip`` and a fake rtnetlink:
network parsing, commands, route/neighbour semantics and validation; cgroup stats (v1 and v2)
and OOM counters, CPU/memory onlining, metrics."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agent_api.agent import guest_details as guest
from agent_api.agent import netlink
from agent_api.agent.cgroups import Cgroup, network_stats
from agent_api.agent.netlink import RouteEntry
from agent_api.agent.network import Network, describe, parse_addrs, route_entry
from agent_api.agent.reaper import RunResult
from common.errors import AlreadyExists, InvalidArgument, NotFound
from proto.kata import agent_pb2, types_pb2

IPROUTE_ADDRS = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever
4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever
4: eth0    inet6 fe80::fc:ff:fe00:1/64 scope link \\       valid_lft forever preferred_lft forever
5: veth1@if4: <BROADCAST> mtu 1500
6: eth1    inet 10.0.0.5 scope global eth1
"""


def test_parse_addrs() -> None:
    addrs = parse_addrs(IPROUTE_ADDRS)
    assert [(a.address, a.mask, a.family) for a in addrs["eth0"]] == [
        ("192.0.2.2", "24", types_pb2.v4), ("fe80::fc:ff:fe00:1", "64", types_pb2.v6)]
    assert addrs["eth1"][0].mask == "32"
    assert "veth1" not in addrs


class FakeIp:
    def __init__(self, sysfs: Path) -> None:
        self.calls: list[list[str]] = []
        self.sysfs = sysfs

    async def __call__(self, argv: list[str]) -> RunResult:
        self.calls.append(argv)
        if argv[1:4] == ["link", "set", "dev"] and argv[5:6] == ["name"]:
            (self.sysfs / argv[4]).rename(self.sysfs / argv[6])
        if argv[1:] == ["-o", "addr", "show"]:
            return RunResult(0, IPROUTE_ADDRS.replace("eth0", "net0").encode(), b"")
        if argv[-1] == "fail":
            return RunResult(2, b"", b"RTNETLINK answers: File exists")
        return RunResult(0, b"", b"")


def fake_sysfs(root: Path, links: tuple[tuple[str, str, str], ...] = (
        ("lo", "00:00:00:00:00:00", "772"), ("eth0", "52:54:00:12:34:56", "1"))) -> Path:
    for name, mac, kind in links:
        d = root / name
        d.mkdir(parents=True)
        (d / "address").write_text(mac + "\n")
        (d / "mtu").write_text("1500\n")
        (d / "flags").write_text("0x1003\n")
        (d / "type").write_text(kind + "\n")
    return root


class FakeRtnl:
    """Network's view of rtnetlink: a route table and neighbours in memory, changes recorded."""

    def __init__(self, links: dict[str, int], routes: list[RouteEntry]) -> None:
        self.links = links
        self.table = list(routes)
        self.log: list[tuple[str, RouteEntry]] = []
        self.neighbors: list[tuple[int, str, bytes, int, int]] = []

    def __call__(self) -> FakeRtnl:
        return self

    def __enter__(self) -> FakeRtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def routes(self, family: int) -> list[RouteEntry]:
        return [r for r in self.table if r.family == family]

    def replace_route(self, route: RouteEntry, what: str) -> None:
        self.log.append(("replace", route))
        self.table = [r for r in self.table if (r.family, r.dst, r.dst_len, r.table, r.priority)
                      != (route.family, route.dst, route.dst_len, route.table, route.priority)] + [route]

    def delete_route(self, route: RouteEntry, what: str) -> None:
        self.log.append(("delete", route))
        if route not in self.table:
            raise NotFound(what)
        self.table.remove(route)

    def replace_neighbor(self, ifindex: int, dst: str, lladdr: bytes, state: int, flags: int, what: str) -> None:
        self.neighbors.append((ifindex, dst, lladdr, state, flags))

    def index(self, name: str) -> int:
        if name not in self.links:
            raise NotFound(f"no link named {name!r}")
        return self.links[name]

    def name(self, index: int) -> str:
        return {i: n for n, i in self.links.items()}.get(index, "")


def network(tmp_path: Path, rtnl: FakeRtnl | None = None) -> tuple[Network, FakeIp]:
    sysfs = fake_sysfs(tmp_path / "net")
    ip = FakeIp(sysfs)
    return Network(None, sys_net=str(sysfs), runner=ip,
                   rtnl=rtnl or FakeRtnl({"lo": 1, "eth0": 2}, [])), ip


async def test_update_interface_by_mac(tmp_path: Path) -> None:
    net, ip = network(tmp_path)
    iface = types_pb2.Interface(name="net0", hwAddr="52:54:00:12:34:56", mtu=1400, IPAddresses=[
        types_pb2.IPAddress(address="192.0.2.2", mask="24"),
        types_pb2.IPAddress(family=types_pb2.v6, address="2001:db8::2", mask="64"),
        types_pb2.IPAddress(address="198.51.100.7", mask="32")])
    result = await net.update_interface(iface)
    assert result.name == "net0" and result.hwAddr == "52:54:00:12:34:56" and result.type == "ether"
    assert result.raw_flags == 0x1003 and result.IPAddresses[0].address == "192.0.2.2"
    cmds = [" ".join(c[1:]) for c in ip.calls if c[1:3] != ["-o", "addr"]]
    assert cmds == ["link set dev eth0 down", "link set dev eth0 name net0", "addr flush dev net0",
                    "addr add 192.0.2.2/24 brd + dev net0", "addr add 2001:db8::2/64 dev net0",
                    "addr add 198.51.100.7/32 dev net0", "link set dev net0 mtu 1400 arp on up"]
    ip.calls.clear()
    await net.update_interface(types_pb2.Interface(hwAddr="52:54:00:12:34:56", raw_flags=0x80))
    assert [" ".join(c[1:]) for c in ip.calls if c[1:3] != ["-o", "addr"]] == [
        "link set dev net0 down", "addr flush dev net0", "link set dev net0 arp off up"]


async def test_update_interface_errors(tmp_path: Path) -> None:
    net, ip = network(tmp_path)
    with pytest.raises(NotFound):
        await net.update_interface(types_pb2.Interface(name="nope", hwAddr="02:00:00:00:00:09"))
    with pytest.raises(NotFound):  # the MAC decides, not the name
        await net.update_interface(types_pb2.Interface(name="eth0", hwAddr="02:00:00:00:00:09"))
    with pytest.raises(AlreadyExists):
        await net.update_interface(types_pb2.Interface(name="lo", hwAddr="52:54:00:12:34:56"))
    for bad in (types_pb2.Interface(name="x; rm -rf /"), types_pb2.Interface(),
                types_pb2.Interface(name="eth0", IPAddresses=[types_pb2.IPAddress(address="300.1.1.1", mask="24")]),
                types_pb2.Interface(name="eth0", IPAddresses=[types_pb2.IPAddress(address="192.0.2.1", mask="33")]),
                types_pb2.Interface(name="eth0", mtu=20), types_pb2.Interface(name="eth0", hwAddr="zz")):
        with pytest.raises(InvalidArgument):
            await net.update_interface(bad)
    assert ip.calls == []  # nothing was touched


V4, V6 = socket.AF_INET, socket.AF_INET6


def guest_table() -> list[RouteEntry]:
    return [
        RouteEntry(V4, "192.0.2.0", 24, oif=2, prefsrc="192.0.2.2", scope=253, protocol=netlink.RTPROT_KERNEL),
        RouteEntry(V4, "", 0, gateway="192.0.2.1", oif=2),                      # a previous UpdateRoutes
        RouteEntry(V4, "203.0.113.0", 24, oif=2, scope=253, protocol=4),       # static, not wanted
        RouteEntry(V4, "127.0.0.0", 8, oif=1, protocol=4),                      # on lo: kept
        RouteEntry(V4, "192.0.2.255", 32, oif=2, table=255, type=3, protocol=2),  # local table
        RouteEntry(V6, "fe80::", 64, oif=2, protocol=netlink.RTPROT_KERNEL, priority=256),
        RouteEntry(V6, "2001:db8::", 64, oif=2, protocol=netlink.RTPROT_KERNEL, priority=256),
    ]


WANTED = [
    types_pb2.Route(gateway="192.0.2.1", device="eth0"),
    types_pb2.Route(family=types_pb2.v6, gateway="2001:db8::1", device="eth0"),
    types_pb2.Route(dest="10.1.0.0/16", gateway="192.0.2.254", device="eth0"),
    types_pb2.Route(dest="192.0.2.0/24", device="eth0", source="192.0.2.2", scope=253),
    types_pb2.Route(dest="169.254.1.1/32", device="eth0"),
    types_pb2.Route(dest="2001:db8::/64", device="eth0", family=types_pb2.v6),
]


async def test_update_routes_keeps_kernel_routes_and_orders(tmp_path: Path) -> None:
    rtnl = FakeRtnl({"lo": 1, "eth0": 2}, guest_table())
    net, _ = network(tmp_path, rtnl)
    listed = await net.update_routes(agent_pb2.Routes(Routes=WANTED))
    deleted = [e for op, e in rtnl.log if op == "delete"]
    assert [(e.dst, e.gateway) for e in deleted] == [("", "192.0.2.1"), ("203.0.113.0", "")]
    added = [e for op, e in rtnl.log if op == "replace"]
    assert [(e.family, e.dst, e.dst_len, e.gateway, e.oif, e.scope) for e in added] == [
        (V4, "169.254.1.1", 32, "", 2, 253),       # link routes first (kernel's subnet routes kept)
        (V4, "10.1.0.0", 16, "192.0.2.254", 2, 0),  # then via a gateway
        (V4, "", 0, "192.0.2.1", 2, 0),             # default routes last
        (V6, "", 0, "2001:db8::1", 2, 0)]
    assert all(e.protocol == netlink.RTPROT_BOOT and e.table == netlink.RT_TABLE_MAIN for e in added)
    got = {(r.dest, r.gateway, r.device, r.family) for r in listed.Routes}
    assert ("", "192.0.2.1", "eth0", types_pb2.v4) in got and ("127.0.0.0/8", "", "lo", types_pb2.v4) in got
    assert ("192.0.2.255/32", "", "eth0", types_pb2.v4) not in got and len(got) == 8

    # a second call with the same routes: ours are deleted and added again, nothing fails
    rtnl.log.clear()
    again = await net.update_routes(agent_pb2.Routes(Routes=WANTED))
    assert {(r.dest, r.gateway, r.device) for r in again.Routes} == {(d, g, n) for d, g, n, _ in got}
    assert len([1 for op, _ in rtnl.log if op == "delete"]) == 4
    # and an empty list removes every route but the kernel's and lo's
    await net.update_routes(agent_pb2.Routes())
    assert {(e.dst, e.oif) for e in rtnl.table} == {("192.0.2.0", 2), ("127.0.0.0", 1), ("192.0.2.255", 2),
                                                    ("fe80::", 2), ("2001:db8::", 2)}


@pytest.mark.parametrize("route,err", [
    (types_pb2.Route(dest="not-a-net", device="eth0"), InvalidArgument),
    (types_pb2.Route(dest="10.0.0.0/8", gateway="2001:db8::1", device="eth0"), InvalidArgument),
    (types_pb2.Route(dest="10.0.0.0/8"), InvalidArgument),
    (types_pb2.Route(dest="10.0.0.0/8", device="eth0; reboot"), InvalidArgument),
    (types_pb2.Route(dest="10.0.0.0/8", device="eth0", scope=256), InvalidArgument),
    (types_pb2.Route(device="eth0", family=7), InvalidArgument),  # type: ignore[arg-type]
    (types_pb2.Route(dest="10.0.0.0/8", gateway="10.9.9.9", source="bogus", device="eth0"), InvalidArgument),
    (types_pb2.Route(dest="10.0.0.0/8", device="eth9"), NotFound),
])
async def test_update_routes_validates_before_changing(tmp_path: Path, route: types_pb2.Route,
                                                       err: type[Exception]) -> None:
    rtnl = FakeRtnl({"lo": 1, "eth0": 2}, guest_table())
    net, _ = network(tmp_path, rtnl)
    with pytest.raises(err):
        await net.update_routes(agent_pb2.Routes(Routes=[WANTED[0], route]))
    assert rtnl.log == [] and rtnl.table == guest_table()


def test_route_entry_defaults() -> None:
    index = {"eth0": 2}.__getitem__
    e = route_entry(types_pb2.Route(dest="10.2.0.0/16", device="eth0"), index)
    assert (e.scope, e.family, e.dst, e.dst_len) == (netlink.RT_SCOPE_LINK, V4, "10.2.0.0", 16)
    e = route_entry(types_pb2.Route(dest="2001:db8:1::5/48", device="eth0"), index)  # family from dest
    assert (e.family, e.dst, e.dst_len, e.scope) == (V6, "2001:db8:1::", 48, 0)
    e = route_entry(types_pb2.Route(dest="default", gateway="10.0.0.1", flags=4 | 16), index)
    assert (e.dst_len, e.oif, e.flags) == (0, 0, netlink.RTNH_F_ONLINK)
    e = route_entry(types_pb2.Route(dest="::/0", device="eth0", family=types_pb2.v6), index)
    assert (e.family, e.dst, e.dst_len) == (V6, "", 0)
    assert describe(e, lambda i: {2: "eth0"}.get(i, "")) == "default dev eth0"
    e = route_entry(types_pb2.Route(dest="10.1.0.0/16", gateway="10.0.0.1", device="eth0"), index)
    assert describe(e, lambda i: "") == "10.1.0.0/16 via 10.0.0.1 dev 2"


def neighbor(addr: str, dev: str = "eth0", lladdr: str = "02:00:00:00:00:01", state: int = 0,
             flags: int = 0, family: types_pb2.IPFamily = types_pb2.v4) -> types_pb2.ARPNeighbor:
    return types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(family=family, address=addr), device=dev,
                                 lladdr=lladdr, state=state, flags=flags)


async def test_add_arp_neighbors(tmp_path: Path) -> None:
    rtnl = FakeRtnl({"lo": 1, "eth0": 2}, [])
    net, _ = network(tmp_path, rtnl)
    await net.add_arp_neighbors(agent_pb2.ARPNeighbors(ARPNeighbors=[
        neighbor("192.0.2.1", state=0x80), neighbor("2001:db8::1", lladdr="02:00:00:00:00:0A", family=types_pb2.v6),
        neighbor("192.0.2.9", lladdr="", state=0x40, flags=0x08)]))
    assert rtnl.neighbors == [(2, "192.0.2.1", bytes.fromhex("020000000001"), 0x80, 0),
                              (2, "2001:db8::1", bytes.fromhex("02000000000a"), 0x80, 0),
                              (2, "192.0.2.9", b"", 0x40, 0x08)]
    await net.add_arp_neighbors(agent_pb2.ARPNeighbors())


@pytest.mark.parametrize("bad,err", [
    (types_pb2.ARPNeighbor(device="eth0", lladdr="02:00:00:00:00:01"), InvalidArgument),
    (neighbor("192.0.2.300"), InvalidArgument),
    (neighbor("192.0.2.1", family=types_pb2.v6), InvalidArgument),
    (neighbor("192.0.2.1", dev=""), InvalidArgument),
    (neighbor("192.0.2.1", dev="../eth0"), InvalidArgument),
    (neighbor("192.0.2.1", lladdr="02:00:00:00:00"), InvalidArgument),
    (neighbor("192.0.2.1", lladdr="gg:00:00:00:00:01"), InvalidArgument),
    (neighbor("192.0.2.1", state=0x100), InvalidArgument),
    (neighbor("192.0.2.1", state=-1), InvalidArgument),
    (neighbor("192.0.2.1", flags=256), InvalidArgument),
    (neighbor("192.0.2.1", dev="eth7"), NotFound),
])
async def test_add_arp_neighbors_rejects(tmp_path: Path, bad: types_pb2.ARPNeighbor, err: type[Exception]) -> None:
    rtnl = FakeRtnl({"lo": 1, "eth0": 2}, [])
    net, _ = network(tmp_path, rtnl)
    with pytest.raises(err):
        await net.add_arp_neighbors(agent_pb2.ARPNeighbors(ARPNeighbors=[neighbor("192.0.2.1"), bad]))
    assert rtnl.neighbors == []


async def test_list_interfaces(tmp_path: Path) -> None:
    net, _ = network(tmp_path)
    listed = await net.list_interfaces()
    assert [i.name for i in listed.Interfaces] == ["eth0", "lo"]
    assert listed.Interfaces[1].type == "loopback"


def _files(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_cgroup_v2_stats_and_oom(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _files(root, {"cgroup.controllers": "cpu memory pids\n"})
    _files(root / "kc" / "c1", {
        "cpu.stat": ("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\n"
                     "throttled_usec 7\n"),
        "memory.current": "4096\n", "memory.max": "max\n", "memory.peak": "8192\n",
        "memory.stat": "anon 100\nfile 200\n", "memory.events": "low 0\nmax 2\noom 1\noom_kill 3\n",
        "pids.current": "2\n", "pids.max": "64\n", "cgroup.procs": "10\n11\n"})
    cg = Cgroup("/kc/c1", str(root))
    st = cg.stats()
    assert st.cpu_stats.cpu_usage.total_usage == 1_500_000
    assert st.cpu_stats.cpu_usage.usage_in_kernelmode == 500_000
    assert st.cpu_stats.throttling_data.throttled_periods == 1
    assert st.memory_stats.usage.usage == 4096 and st.memory_stats.usage.limit == 2**64 - 1
    assert st.memory_stats.usage.max_usage == 8192 and st.memory_stats.usage.failcnt == 2
    assert st.memory_stats.cache == 200 and dict(st.memory_stats.stats) == {"anon": 100, "file": 200}
    assert (st.pids_stats.current, st.pids_stats.limit) == (2, 64)
    assert cg.oom_kills() == 3 and cg.pids() == [10, 11]


def test_cgroup_v1_stats(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _files(root / "cpuacct" / "kc" / "c1", {"cpuacct.usage": "123\n", "cpuacct.usage_percpu": "100 23 \n",
                                           "cpuacct.stat": "user 2\nsystem 1\n"})
    _files(root / "memory" / "kc" / "c1", {"memory.usage_in_bytes": "50\n", "memory.limit_in_bytes": "100\n",
                                          "memory.max_usage_in_bytes": "60\n", "memory.failcnt": "0\n",
                                          "memory.stat": "cache 5\ntotal_cache 9\n", "memory.use_hierarchy": "1\n",
                                          "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"})
    _files(root / "pids" / "kc" / "c1", {"pids.current": "3\n", "pids.max": "max\n", "cgroup.procs": "7\n"})
    cg = Cgroup("/kc/c1", str(root))
    st = cg.stats()
    assert st.cpu_stats.cpu_usage.total_usage == 123 and list(st.cpu_stats.cpu_usage.percpu_usage) == [100, 23]
    assert st.cpu_stats.cpu_usage.usage_in_usermode == 20_000_000
    assert (st.memory_stats.usage.usage, st.memory_stats.usage.limit, st.memory_stats.cache) == (50, 100, 9)
    assert st.memory_stats.use_hierarchy and st.pids_stats.current == 3
    assert cg.oom_kills() == 1 and cg.pids() == [7]


def test_network_stats(tmp_path: Path) -> None:
    _files(tmp_path / "42" / "net", {"dev": (
        "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|...\n"
        "    lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n"
        "  eth0: 100 2 3 4 0 0 0 0 200 5 6 7 0 0 0 0\n")})
    [eth0] = network_stats(42, str(tmp_path))
    assert (eth0.name, eth0.rx_bytes, eth0.rx_dropped, eth0.tx_bytes, eth0.tx_dropped) == ("eth0", 100, 4, 200, 7)


async def test_online_cpu_mem_and_details(tmp_path: Path) -> None:
    cpu, mem = tmp_path / "cpu", tmp_path / "mem"
    for i, state in ((1, "0"), (2, "1"), (3, "0")):
        _files(cpu / f"cpu{i}", {"online": state})
    _files(mem / "memory8", {"state": "offline"})
    _files(mem / "memory9", {"state": "online"})
    _files(mem, {"block_size_bytes": "8000000\n", "probe": ""})
    await guest.online_cpu_mem(agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=1, cpu_only=True),
                               sys_cpu=str(cpu), sys_mem=str(mem))
    assert [(cpu / f"cpu{i}" / "online").read_text() for i in (1, 2, 3)] == ["1", "1", "0"]
    assert (mem / "memory8" / "state").read_text() == "offline"
    await guest.online_cpu_mem(agent_pb2.OnlineCPUMemRequest(wait=True), sys_cpu=str(cpu), sys_mem=str(mem))
    assert (cpu / "cpu3" / "online").read_text() == "1"
    assert (mem / "memory8" / "state").read_text() == "online"
    d = guest.guest_details(agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True),
                            sys_mem=str(mem))
    assert d.mem_block_size_bytes == 0x8000000 and d.support_mem_hotplug_probe
    assert d.agent_details.version and "9p" in d.agent_details.storage_handlers


def test_metrics_text() -> None:
    text = guest.metrics_text()
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {"kata_agent_process_cpu_seconds_total", "kata_agent_process_resident_memory_bytes",
            "kata_guest_load", "kata_guest_meminfo", "kata_guest_cpu_time"} <= names
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


async def test_update_interface_waits_for_a_hot_plugged_nic(tmp_path: Path, monkeypatch) -> None:
    from agent_api.agent import network as netmod

    net, ip = network(tmp_path)
    sysfs = tmp_path / "net"
    iface = types_pb2.Interface(name="eth1", hwAddr="52:54:00:00:00:99", devicePath="03/00")

    async def plug_later() -> None:
        await asyncio.sleep(0.1)  # the guest kernel's PCIe hotplug + virtio-net probe
        d = sysfs / "eth9"
        d.mkdir()
        (d / "address").write_text("52:54:00:00:00:99\n")
        (d / "mtu").write_text("1500\n")
        (d / "flags").write_text("0x1002\n")
        (d / "type").write_text("1\n")

    plug = asyncio.create_task(plug_later())
    result = await net.update_interface(iface)
    await plug
    assert result.name == "eth1"
    monkeypatch.setattr(netmod, "HOTPLUG_WAIT", 0.05)
    with pytest.raises(NotFound, match="PCI 04/00"):
        await net.update_interface(types_pb2.Interface(hwAddr="52:54:00:00:00:98", devicePath="04/00"))
    with pytest.raises(NotFound):  # without a devicePath there is no waiting
        await net.update_interface(types_pb2.Interface(hwAddr="52:54:00:00:00:97"))
