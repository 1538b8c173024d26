"""Guest side of co-location: SetVcpuPriorities validation, the cpuset groups (on a fake
cgroup tree), /run/kata-colo/vcpu-priorities.json, placement of containers by their
container-priority annotation, and the RPC through AgentClient against an in-process agent."""
from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_api.agent.colo import (
    ANNOTATION_CONTAINER_PRIORITY,
    Colo,
    check_priorities,
    format_cpu_list,
    parse_cpu_list,
    render_json,
)
from agent_api.agent.server import Agent
from agent_api.client.rpc import TIMEOUTS, AgentClient
from common.errors import InvalidArgument, NotFound
from proto.kata import oci_pb2
from shim.resources.qos.annotation import render_guest_json
from tests.support.agent import unit_agent


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-2,5\n") == [0, 1, 2, 5]
    assert parse_cpu_list("3") == [3]
    assert format_cpu_list([5, 0, 1, 2]) == "0-2,5"
    assert format_cpu_list([2, 3]) == "2-3"
    with pytest.raises(ValueError):
        parse_cpu_list("3-1")


def test_check_priorities_accepts_and_sorts() -> None:
    assert check_priorities({"low": [3, 2], "high": [0, 1]}, range(4)) == {"high": [0, 1], "low": [2, 3]}


@pytest.mark.parametrize("mapping", [
    {},                                  # nothing
    {"High": [0]},                       # upper case
    {"-x": [0]},                         # leading dash
    {"a" * 33: [0]},                     # too long
    {"a/b": [0]},                        # path
    {"high": []},                        # empty set
    {"high": [4]},                       # offline
    {"high": [0, 0]},                    # duplicate within
    {"high": [0, 1], "low": [1, 2]},     # shared between priorities
])
def test_check_priorities_rejects(mapping: dict) -> None:
    with pytest.raises(InvalidArgument):
        check_priorities(mapping, range(4))


def test_json_matches_host_format() -> None:
    host = render_guest_json({0: "high", 1: "high", 2: "low", 3: "low"}, ["high", "low"])
    assert json.loads(render_json({"low": [2, 3], "high": [0, 1]})) == json.loads(host)
    doc = json.loads(render_json({"b": [2]}))
    assert doc == {"version": 1, "priorities": {"b": [2]}, "vcpus": [None, None, "b"], "order": ["b"]}


def fake_rmdir(path: str) -> None:
    """rmdir as on cgroupfs: interface files do not count, child groups do."""
    p = Path(path)
    if any(c.is_dir() for c in p.iterdir()):
        raise OSError(39, "Directory not empty", path)
    shutil.rmtree(p)


def fake_colo(tmp_path: Path, online: str = "0-3") -> Colo:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (tmp_path / "online").write_text(online + "\n")
    colo = Colo("/kata-colo", cgroup_root=str(root), run_dir=str(tmp_path / "run"),
                online_path=str(tmp_path / "online"))
    colo.rmdir = fake_rmdir
    return colo


def test_set_creates_groups_json_and_places(tmp_path: Path) -> None:
    colo = fake_colo(tmp_path)
    colo.set({"high": [0, 1], "low": [2, 3]})
    root = tmp_path / "cgroup"
    assert "cpuset" in (root / "cgroup.subtree_control").read_text()
    assert "cpuset" in (root / "kata-colo" / "cgroup.subtree_control").read_text()
    assert (root / "kata-colo" / "prio-high" / "cpuset.cpus").read_text() == "0-1"
    assert (root / "kata-colo" / "prio-low" / "cpuset.cpus").read_text() == "2-3"
    doc = json.loads((tmp_path / "run" / "vcpu-priorities.json").read_text())
    assert doc["priorities"] == {"high": [0, 1], "low": [2, 3]}
    assert doc["vcpus"] == ["high", "high", "low", "low"]

    assert colo.cgroup_parent_for({ANNOTATION_CONTAINER_PRIORITY: "low"}, "/kata-colo") == "/kata-colo/prio-low"
    assert colo.cgroup_parent_for({}, "/kata-colo") == "/kata-colo"
    assert colo.cgroup_parent_for({"other": "x"}, "/kata-colo") == "/kata-colo"
    with pytest.raises(InvalidArgument):
        colo.cgroup_parent_for({ANNOTATION_CONTAINER_PRIORITY: "batch"}, "/kata-colo")

    # a new mapping: groups of dropped priorities go, the JSON follows
    colo.set({"high": [0, 1, 2]})
    assert not (root / "kata-colo" / "prio-low").exists()
    assert (root / "kata-colo" / "prio-high" / "cpuset.cpus").read_text() == "0-2"
    with pytest.raises(InvalidArgument):
        colo.cgroup_parent_for({ANNOTATION_CONTAINER_PRIORITY: "low"}, "/kata-colo")

    # an invalid mapping changes nothing
    with pytest.raises(InvalidArgument):
        colo.set({"high": [7]})
    assert colo.priorities == {"high": [0, 1, 2]}

    colo.cleanup()
    assert not (root / "kata-colo" / "prio-high").exists()
    assert not (tmp_path / "run" / "vcpu-priorities.json").exists()


def test_unknown_priority_before_set(tmp_path: Path) -> None:
    colo = fake_colo(tmp_path)
    with pytest.raises(InvalidArgument):
        colo.cgroup_parent_for({ANNOTATION_CONTAINER_PRIORITY: "low"}, "/kata-colo")
    colo.cleanup()  # nothing to do, nothing touched
    assert not (tmp_path / "cgroup" / "kata-colo").exists()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, str]]:
    a, sock = unit_agent(tmp_path)
    fake = fake_colo(tmp_path)
    a.colo.cgroup_root, a.colo.json_path, a.colo.online_path = fake.cgroup_root, fake.json_path, fake.online_path
    a.colo.rmdir = fake_rmdir
    assert a.colo.cgroup_parent == "/kata-colo-unit-none"
    await a.start()
    yield a, sock
    await a.close()


async def test_rpc_through_client(agent: tuple[Agent, str], tmp_path: Path) -> None:
    a, sock = agent
    assert TIMEOUTS["SetVcpuPriorities"]
    async with AgentClient(f"unix://{sock}") as c:
        await c.wait_ready(5)
        with pytest.raises(InvalidArgument):
            await c.set_vcpu_priorities({"high": [0, 1], "low": [1]})
        spec = oci_pb2.Spec(Process=oci_pb2.Process(Args=["true"]),
                            Annotations={ANNOTATION_CONTAINER_PRIORITY: "low"})
        with pytest.raises(InvalidArgument):  # no priorities set yet
            await c.create_container("c1", spec)
        await c.set_vcpu_priorities({"high": [0, 1], "low": [2, 3]})
        assert a.colo.priorities == {"high": [0, 1], "low": [2, 3]}
        assert (tmp_path / "cgroup" / "kata-colo-unit-none" / "prio-low" / "cpuset.cpus").read_text() == "2-3"
        assert json.loads((tmp_path / "run" / "vcpu-priorities.json").read_text())["order"] == ["high", "low"]
        with pytest.raises(NotFound):  # known priority: gets as far as the (missing) rootfs
            await c.create_container("c1", spec)
        spec.Annotations[ANNOTATION_CONTAINER_PRIORITY] = "batch"
        with pytest.raises(InvalidArgument):
            await c.create_container("c1", spec)
    await a.close()
    assert not (tmp_path / "cgroup" / "kata-colo-unit-none" / "prio-low").exists()
    assert not (tmp_path / "run" / "vcpu-priorities.json").exists()
