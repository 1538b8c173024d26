"""Guest-side helpers against fake sysfs/procfs trees and a fake ``ip``: network parsing and
commands, cgroup stats (v1 and v2) and OOM counters, CPU/memory onlining, metrics."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent_api.agent import guest
from agent_api.agent.cgroups import Cgroup, network_stats
from agent_api.agent.network import Network, parse_addrs, parse_routes, route_argv
from agent_api.agent.reaper import RunResult
from proto.kata import agent_pb2, types_pb2
from shim.errors import InvalidArgument, NotFound

IPROUTE_ADDRS = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever
4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever
4: eth0    inet6 fe80::fc:ff:fe00:1/64 scope link \\       valid_lft forever preferred_lft forever
5: veth1@if4: <BROADCAST> mtu 1500
6: eth1    inet 10.0.0.5 scope global eth1
"""
ROUTES = """\
default via 192.0.2.1 dev eth0
192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2
10.1.0.0/16 via 192.0.2.254 dev eth0 metric 100 onlink
broadcast 192.0.2.255 dev eth0 table local
"""


def test_parse_addrs() -> None:
    addrs = parse_addrs(IPROUTE_ADDRS)
    assert [(a.address, a.mask, a.family) for a in addrs["eth0"]] == [
        ("192.0.2.2", "24", types_pb2.v4), ("fe80::fc:ff:fe00:1", "64", types_pb2.v6)]
    assert addrs["eth1"][0].mask == "32"
    assert "veth1" not in addrs


def test_parse_routes() -> None:
    routes = parse_routes(ROUTES, types_pb2.v4)
    assert [(r.dest, r.gateway, r.device, r.source, r.scope) for r in routes] == [
        ("", "192.0.2.1", "eth0", "", 0),
        ("192.0.2.0/24", "", "eth0", "192.0.2.2", 253),
        ("10.1.0.0/16", "192.0.2.254", "eth0", "", 0)]


def test_route_argv() -> None:
    r = types_pb2.Route(dest="10.0.0.0/8", gateway="192.0.2.1", device="eth0", source="192.0.2.2", scope=253)
    assert route_argv(r) == ["ip", "route", "add", "10.0.0.0/8", "via", "192.0.2.1", "dev", "eth0",
                             "src", "192.0.2.2", "scope", "link"]
    assert route_argv(types_pb2.Route(family=types_pb2.v6, device="eth0"))[:4] == ["ip", "-6", "route", "add"]


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
        if "route" in argv and "show" in argv:
            return RunResult(0, ROUTES.encode() if "-6" not in argv else b"", b"")
        if argv[-1] == "fail":
            return RunResult(2, b"", b"RTNETLINK answers: File exists")
        return RunResult(0, b"", b"")


def fake_sysfs(root: Path) -> Path:
    for name, mac, kind in (("lo", "00:00:00:00:00:00", "772"), ("eth0", "52:54:00:12:34:56", "1")):
        d = root / name
        d.mkdir(parents=True)
        (d / "address").write_text(mac + "\n")
        (d / "mtu").write_text("1500\n")
        (d / "flags").write_text("0x1003\n")
        (d / "type").write_text(kind + "\n")
    return root


async def test_update_interface_by_mac(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "net")
    ip = FakeIp(sysfs)
    net = Network(None, sys_net=str(sysfs), runner=ip)  # type: ignore[arg-type]
    iface = types_pb2.Interface(name="net0", hwAddr="52:54:00:12:34:56", mtu=1400, IPAddresses=[
        types_pb2.IPAddress(address="192.0.2.2", mask="24")])
    result = await net.update_interface(iface)
    assert result.name == "net0" and result.hwAddr == "52:54:00:12:34:56" and result.type == "ether"
    assert result.raw_flags == 0x1003 and result.IPAddresses[0].address == "192.0.2.2"
    cmds = [" ".join(c[1:]) for c in ip.calls if c[1:3] != ["-o", "addr"]]
    assert cmds == ["link set dev eth0 down", "link set dev eth0 name net0", "link set dev net0 mtu 1400",
                    "addr flush dev net0", "addr add 192.0.2.2/24 dev net0", "link set dev net0 up"]
    with pytest.raises(NotFound):
        await net.update_interface(types_pb2.Interface(name="nope", hwAddr="02:00:00:00:00:09"))
    for bad in (types_pb2.Interface(name="x; rm -rf /"), types_pb2.Interface(),
                types_pb2.Interface(name="eth0", IPAddresses=[types_pb2.IPAddress(address="300.1.1.1", mask="24")]),
                types_pb2.Interface(name="eth0", hwAddr="zz")):
        with pytest.raises(InvalidArgument):
            await net.update_interface(bad)


async def test_update_routes_replaces_and_orders(tmp_path: Path) -> None:
    ip = FakeIp(fake_sysfs(tmp_path / "net"))
    net = Network(None, sys_net=str(tmp_path / "net"), runner=ip)  # type: ignore[arg-type]
    want = agent_pb2.Routes(Routes=[types_pb2.Route(gateway="192.0.2.1", device="eth0"),
                                    types_pb2.Route(dest="192.0.2.0/24", device="eth0", scope=253)])
    await net.update_routes(want)
    adds = [c for c in ip.calls if c[1:3] == ["route", "add"]]
    assert adds == [["ip", "route", "add", "192.0.2.0/24", "dev", "eth0", "scope", "link"],
                    ["ip", "route", "add", "default", "via", "192.0.2.1", "dev", "eth0"]]
    dels = [c for c in ip.calls if c[1:3] == ["route", "del"]]
    assert len(dels) == 3
    with pytest.raises(InvalidArgument):
        await net.update_routes(agent_pb2.Routes(Routes=[types_pb2.Route(dest="not-a-net")]))
    listed = await net.list_interfaces()
    assert [i.name for i in listed.Interfaces] == ["eth0", "lo"]


def _files(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_cgroup_v2_stats_and_oom(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _files(root, {"cgroup.controllers": "cpu memory pids\n"})
    _files(root / "kc" / "c1", {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 7\n",
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
            "kata_guest_load1", "kata_guest_meminfo", "kata_guest_cpu_time_seconds_total"} <= names
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
