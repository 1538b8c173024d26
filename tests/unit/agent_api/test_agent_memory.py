"""Guest side of memory elasticity: auto-onlining and the uevent watcher on a fake sysfs,
/proc/meminfo parsing, resources.json (content, validation, atomic replace), the read-only bind
of /run/kata-colo into every container, and SetMemory/GetGuestMemory through AgentClient
against an in-process agent."""
from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from agent_api.agent import memory_hotplug as mh
from agent_api.agent.resources_file import GuestResources, check_memory
from agent_api.agent.spec import RESOURCES_DIR, adapt_for_guest
from agent_api.client.rpc import AgentClient
from common.errors import InvalidArgument
from proto.kata import oci_pb2
from proto.kata_colo import colo_pb2
from tests.support.agent import unit_agent

MIB = 1 << 20
MEMINFO = "MemTotal:        1024000 kB\nMemFree:          512000 kB\nMemAvailable:     768000 kB\n" \
          "Buffers:            1000 kB\nCached:            40000 kB\nHugePages_Total:       0\n"


def fake_sysfs(root: Path, states: dict[int, str]) -> Path:
    mem = root / "memory"
    for n, state in states.items():
        (mem / f"memory{n}").mkdir(parents=True)
        (mem / f"memory{n}" / "state").write_text(state + "\n")
    (mem / "block_size_bytes").write_text("8000000\n")
    (mem / "auto_online_blocks").write_text("offline\n")
    return mem


def test_meminfo_parses_bytes(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)
    info = mh.meminfo(str(tmp_path / "meminfo"))
    assert (info.total, info.free, info.available, info.cached) == (1024000 << 10, 512000 << 10, 768000 << 10,
                                                                    40000 << 10)
    assert mh.meminfo(str(tmp_path / "missing")) == mh.MemInfo()


def test_configure_auto_online_and_online_blocks(tmp_path: Path) -> None:
    mem = fake_sysfs(tmp_path, {0: "online", 1: "offline", 2: "offline"})
    policy = tmp_path / "online_policy"
    policy.write_text("contig-zones\n")
    hp = mh.MemoryHotplug(sys_mem=str(mem), online_policy=str(policy))
    assert hp.configure() == "online (auto-movable)"
    assert (mem / "auto_online_blocks").read_text() == "online" and policy.read_text() == "auto-movable"
    assert mh.block_size(str(mem)) == 128 * MIB
    assert len(mh.offline_blocks(str(mem))) == 2
    assert mh.online_blocks(str(mem)) == 2
    assert {(mem / f"memory{n}" / "state").read_text().strip() for n in range(3)} == {"online"}
    # a kernel without the auto-movable policy: online_movable
    hp = mh.MemoryHotplug(sys_mem=str(mem), online_policy=str(tmp_path / "no" / "policy"))
    assert hp.configure() == "online_movable"
    # no memory hotplug in the kernel at all
    assert mh.MemoryHotplug(sys_mem=str(tmp_path / "none")).configure() == ""


def test_parse_uevent() -> None:
    ev = mh.parse_uevent(b"add@/devices/system/memory/memory40\0ACTION=add\0DEVPATH=/devices/system/memory/"
                         b"memory40\0SUBSYSTEM=memory\0SEQNUM=1234\0")
    assert ev == {"ACTION": "add", "DEVPATH": "/devices/system/memory/memory40", "SUBSYSTEM": "memory",
                  "SEQNUM": "1234"}
    assert mh.parse_uevent(b"libudev\0garbage") == {}


async def test_watcher_onlines_new_blocks_and_reports_changes(tmp_path: Path) -> None:
    """The watcher's loop fed through a socketpair instead of the kernel's netlink socket."""
    import socket

    mem = fake_sysfs(tmp_path, {0: "online"})
    changed = asyncio.Event()
    hp = mh.MemoryHotplug(on_change=changed.set, sys_mem=str(mem))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    task = asyncio.get_running_loop().create_task(hp._watch(a))
    try:
        (mem / "memory9").mkdir()
        (mem / "memory9" / "state").write_text("offline\n")
        b.send(b"add@/devices/system/cpu/cpu3\0ACTION=add\0SUBSYSTEM=cpu\0")  # ignored
        b.send(b"add@/devices/system/memory/memory9\0ACTION=add\0SUBSYSTEM=memory\0")
        await asyncio.wait_for(changed.wait(), 5)
        assert (mem / "memory9" / "state").read_text() == "online"
    finally:
        task.cancel()
        a.close()
        b.close()


def test_resources_json_content_and_validation(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "online").write_text("0-3\n")
    res = GuestResources(str(tmp_path / "run"), online_path=str(tmp_path / "online"),
                         meminfo_path=str(tmp_path / "meminfo"))
    res.set_priorities({"high": [1, 0], "low": [2, 3]})
    res.set_memory({"usable_bytes": 1 << 30, "target_bytes": 1 << 30, "max_bytes": 2 << 30,
                    "floor_bytes": 300 * MIB, "mechanisms": ["virtio-mem", "balloon"]})
    doc = json.loads((tmp_path / "run" / "resources.json").read_text())
    assert doc["version"] == 1 and doc["vcpus"] == {"online": [0, 1, 2, 3], "priorities": {"high": [0, 1],
                                                                                          "low": [2, 3]}}
    assert doc["memory"] == {"total_bytes": 1024000 << 10, "available_bytes": 768000 << 10, "usable_bytes": 1 << 30,
                             "target_bytes": 1 << 30, "max_bytes": 2 << 30, "floor_bytes": 300 * MIB,
                             "mechanisms": ["virtio-mem", "balloon"]}
    assert oct(os.stat(tmp_path / "run" / "resources.json").st_mode & 0o777) == "0o644"
    for bad in ({"target_bytes": -1}, {"max_bytes": 1 << 60}, {"usable_bytes": "1G"}, {"floor_bytes": True},
                {"mechanisms": ["swap"]}, {"mechanisms": ["balloon"] * 4}):
        with pytest.raises(InvalidArgument):
            check_memory(bad)
    res.remove()
    assert not (tmp_path / "run" / "resources.json").exists()


def test_resources_json_is_replaced_atomically(tmp_path: Path) -> None:
    """Readers racing a writer never see a partial or missing file."""
    res = GuestResources(str(tmp_path))
    res.write()
    path = tmp_path / "resources.json"
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                bad.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        res.set_memory({"target_bytes": i * MIB, "mechanisms": []})
    stop.set()
    t.join()
    assert bad == [] and json.loads(path.read_text())["memory"]["target_bytes"] == 299 * MIB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resources.json"]  # no temp file left


def test_every_container_sees_the_run_dir_read_only() -> None:
    spec = oci_pb2.Spec(Process=oci_pb2.Process(Args=["true"], Cwd="/"),
                        Mounts=[oci_pb2.Mount(destination="/run", type="tmpfs", source="tmpfs")])
    cfg = adapt_for_guest(spec, container_id="c1", shared_dir="/run/kata-containers/shared/containers",
                          cgroup_parent="/kata-colo")
    assert [m["destination"] for m in cfg["mounts"]] == ["/run", RESOURCES_DIR]  # after the /run tmpfs
    assert cfg["mounts"][-1] == {"destination": RESOURCES_DIR, "type": "bind", "source": RESOURCES_DIR,
                                 "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}
    # a container that mounts that path itself keeps its own
    spec.Mounts.append(oci_pb2.Mount(destination="/run/kata-colo/", type="tmpfs", source="tmpfs"))
    cfg = adapt_for_guest(spec, container_id="c1", shared_dir="/run/kata-containers/shared/containers",
                          cgroup_parent="/kata-colo")
    assert [m["destination"] for m in cfg["mounts"]] == ["/run", "/run/kata-colo/"]


async def test_set_memory_and_guest_memory_over_ttrpc(tmp_path: Path) -> None:
    agent, sock = unit_agent(tmp_path)
    await agent.start()
    try:
        assert agent.memory is None  # not the guest's init: the host's memory blocks stay alone
        async with AgentClient(f"unix://{sock}") as c:
            await c.wait_ready(5)
            state = colo_pb2.MemoryState(usable_bytes=600 * MIB, target_bytes=600 * MIB, max_bytes=1 << 30,
                                         floor_bytes=256 * MIB, mechanisms=["balloon"])
            got = await c.set_memory(state)
            assert got.total_bytes > 0 and got.available_bytes > 0
            doc = json.loads((tmp_path / "resources.json").read_text())  # beside the agent's state dir
            assert doc["memory"]["target_bytes"] == 600 * MIB and doc["memory"]["mechanisms"] == ["balloon"]
            with pytest.raises(InvalidArgument, match="mechanisms"):
                await c.set_memory(colo_pb2.MemoryState(mechanisms=["swap"]))
            assert (await c.get_guest_memory()).total_bytes == got.total_bytes
    finally:
        await agent.close()
    assert not (tmp_path / "resources.json").exists()
