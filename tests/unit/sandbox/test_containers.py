"""ContainerOps (the product backend) driven by the real TaskService over the real ttrpc server,
on a Sandbox of fakes (hypervisor, agent, resources): what containerd sees when the VM dies
(every waiting process exits 255, with events), a kill before start (137), OOM forwarding,
exec, two containers in one sandbox, and untyped errors from the backend (INTERNAL, traceback
logged, nothing left behind)."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

import shim.resources
from common.errors import AgentError, FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable
from hypervisor import registry
from proto.containerd.task.v2 import shim_pb2
from shim import events as ev
from shim.backend import BackendContext
from shim.process import Status
from shim.resources.manager import JOURNAL
from shim.sandbox.containers import EXIT_KILLED, EXIT_VM_GONE, ContainerOps
from shim.sandbox.sandbox import Sandbox, State
from tests.fakes.agent import FakeGuestAgent
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.resources import FakeResource, FakeShareFs, Recorder, resource_class
from tests.support.task_harness import ShimHarness, task_harness

CONFIG = "[hypervisor.qemu]\ndefault_vcpus = 1\n"


@dataclass
class Pod:
    h: ShimHarness
    hv: FakeHypervisor
    agent: FakeGuestAgent
    rec: Recorder
    classes: list[type[FakeResource]]

    @property
    def ops(self) -> ContainerOps:
        backend = self.h.service.backend
        assert isinstance(backend, ContainerOps)
        return backend

    @property
    def sandbox(self) -> Sandbox:
        return self.ops.sandbox

    @property
    def share(self) -> Any:
        return self.classes[0].instances[0].share  # type: ignore[attr-defined]

    async def create(self, cid: str, args: list[str] | None = None, **kw: Any) -> int:
        resp = await self.h.create(cid, ["sh"] if args is None else args, **kw)
        return int(resp.pid)

    async def start(self, cid: str, exec_id: str = "") -> int:
        resp = await self.h.call("Start", shim_pb2.StartRequest(id=cid, exec_id=exec_id), shim_pb2.StartResponse)
        return int(resp.pid)

    async def wait(self, cid: str, exec_id: str = "", timeout: float = 5) -> int:
        resp = await self.h.call("Wait", shim_pb2.WaitRequest(id=cid, exec_id=exec_id), shim_pb2.WaitResponse,
                                 timeout=timeout)
        return int(resp.exit_status)

    async def delete(self, cid: str, exec_id: str = "") -> shim_pb2.DeleteResponse:
        return await self.h.call("Delete", shim_pb2.DeleteRequest(id=cid, exec_id=exec_id), shim_pb2.DeleteResponse)

    async def state(self, cid: str, exec_id: str = "") -> shim_pb2.StateResponse:
        return await self.h.call("State", shim_pb2.StateRequest(id=cid, exec_id=exec_id), shim_pb2.StateResponse)

    def events(self, topic: str) -> list[Any]:
        return [msg for t, msg in self.h.sink.decoded() if t == topic]

    async def wait_events(self, topic: str, n: int, timeout: float = 5) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.events(topic)) < n:
            assert loop.time() < deadline, f"{topic}: {self.h.sink.topics}"
            await asyncio.sleep(0.005)
        return self.events(topic)

    def leftovers(self) -> dict[str, Any]:
        state = self.h.service.state_dir
        left = {"objects": sorted(p.name for p in state.glob("*.obj")) if state.exists() else [],
                "vm dir": (state / "vm").exists(), "journal": (state / JOURNAL).exists(),
                "binds": dict(self.share.binds) if self.classes[0].instances else {}}
        return {k: v for k, v in left.items() if v}


def exec_spec(args: list[str]) -> any_pb2.Any:
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps({"args": args, "cwd": "/", "env": []}).encode())


@pytest.fixture
async def pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pod]:
    rec = Recorder()
    classes = [resource_class("sharefs", rec, base=FakeShareFs), resource_class("net", rec)]
    monkeypatch.setattr(shim.resources, "SANDBOX_RESOURCES", tuple(classes))
    monkeypatch.setitem(registry.DRIVERS, "fake", FakeHypervisor.REGISTRY_TARGET)
    monkeypatch.setattr(FakeHypervisor, "recovered", [])
    config = tmp_path / "configuration.toml"
    config.write_text(CONFIG)
    hv, agent = FakeHypervisor(pid=4242, console="[    1.0] guest kernel says hello\n"), FakeGuestAgent()

    def factory(ctx: BackendContext) -> ContainerOps:
        return ContainerOps(Sandbox(ctx, hypervisor_factory=lambda name: hv, agent_factory=agent.factory))

    async with task_harness(tmp_path, factory, sandbox_id="pod", config_path=str(config)) as h:
        yield Pod(h, hv, agent, rec, classes)


async def test_lifecycle_output_exit_and_release(pod: Pod):
    pid = await pod.create("pod", ["echo", "hi"])
    assert pid == 4242                                        # kata reports the VMM's pid
    assert [n for n in pod.agent.names() if n != "next_oom"] == ["connect", "create_sandbox", "create_container"]
    guest_spec = pod.agent.containers["pod"]
    assert guest_spec["root"]["path"] == "/run/kata-containers/shared/containers/pod/rootfs"
    assert pod.share.binds["pod/rootfs"][0].endswith("/bundles/pod/rootfs")
    assert await pod.start("pod") == 4242
    pod.agent.exit("pod", "", 3, stdout=b"hi\n")
    assert await pod.wait("pod") == 3
    assert pod.h.output("pod") == "hi\n"                      # output delivered before the exit
    (exit_ev,) = await pod.wait_events(ev.TOPIC_EXIT, 1)
    assert (exit_ev.container_id, exit_ev.exit_status, exit_ev.pid) == ("pod", 3, 4242)
    resp = await pod.delete("pod")
    assert resp.exit_status == 3
    assert pod.sandbox.state is State.STOPPED
    await pod.wait_events(ev.TOPIC_DELETE, 1)
    assert pod.h.sink.topics == [ev.TOPIC_CREATE, ev.TOPIC_START, ev.TOPIC_EXIT, ev.TOPIC_DELETE]
    assert pod.rec.phases("teardown") == ["net", "sharefs"]
    assert pod.leftovers() == {}


async def test_vm_death_exits_every_waiting_process_with_255(pod: Pod):
    await pod.create("pod", ["sleep", "1000"])
    await pod.start("pod")
    await pod.h.call("Exec", shim_pb2.ExecProcessRequest(id="pod", exec_id="e1", spec=exec_spec(["top"])))
    await pod.start("pod", "e1")
    waits = [asyncio.ensure_future(pod.wait("pod")), asyncio.ensure_future(pod.wait("pod", "e1"))]
    await asyncio.sleep(0.02)
    assert not any(w.done() for w in waits)
    # QEMU dies: its exit resolves wait() and the agent's socket closes with it
    pod.hv.die(-signal.SIGKILL)
    pod.agent.lose_connection()
    assert await asyncio.gather(*waits) == [EXIT_VM_GONE, EXIT_VM_GONE]
    exits = await pod.wait_events(ev.TOPIC_EXIT, 2)
    assert sorted((e.id, e.exit_status) for e in exits) == [("e1", 255), ("pod", 255)]
    assert (await pod.state("pod")).status == Status.STOPPED
    assert not pod.sandbox.running
    with pytest.raises(FailedPrecondition, match="stopped"):  # new work is refused clearly
        await pod.h.call("Exec", shim_pb2.ExecProcessRequest(id="pod", exec_id="e2", spec=exec_spec(["x"])))
    await pod.delete("pod", "e1")
    await pod.delete("pod")
    assert pod.leftovers() == {}
    await pod.wait_events(ev.TOPIC_DELETE, 1)
    assert pod.h.sink.topics[-1] == ev.TOPIC_DELETE


async def test_process_started_after_the_vm_died_is_refused(pod: Pod):
    await pod.create("pod")
    pod.hv.die(1)
    await asyncio.wait_for(pod.sandbox.vm_gone.wait(), 1)
    with pytest.raises(FailedPrecondition, match="VM is not running"):
        await pod.start("pod")
    await pod.delete("pod")
    assert pod.leftovers() == {}


async def test_kill_before_start_is_137(pod: Pod):
    await pod.create("pod", ["sleep", "1000"])
    await pod.h.call("Kill", shim_pb2.KillRequest(id="pod", signal=signal.SIGTERM))
    assert ("signal_process", ("pod", "", signal.SIGKILL, False)) in pod.agent.calls  # runc's init: SIGKILL
    assert await pod.wait("pod") == EXIT_KILLED == 137
    (exit_ev,) = await pod.wait_events(ev.TOPIC_EXIT, 1)
    assert exit_ev.exit_status == 137
    assert "start_container" not in pod.agent.names()
    assert (await pod.delete("pod")).exit_status == 137
    assert pod.leftovers() == {}


async def test_delete_before_start_is_137(pod: Pod):
    await pod.create("pod")
    assert (await pod.delete("pod")).exit_status == 137
    (delete_ev,) = await pod.wait_events(ev.TOPIC_DELETE, 1)
    assert delete_ev.exit_status == 137
    assert pod.leftovers() == {}


async def test_oom_is_forwarded(pod: Pod):
    await pod.create("pod")
    await pod.start("pod")
    pod.agent.oom("not-ours")                                 # a container this shim does not know
    pod.agent.oom("pod")
    (oom,) = await pod.wait_events(ev.TOPIC_OOM, 1)
    assert oom.container_id == "pod"
    await asyncio.sleep(0.02)
    assert len(pod.events(ev.TOPIC_OOM)) == 1
    pod.agent.exit("pod", "", 137)
    await pod.wait("pod")
    await pod.delete("pod")


async def test_exec_output_signal_and_delete(pod: Pod):
    await pod.create("pod")
    await pod.start("pod")
    out = pod.h.tmp / "e1.out"
    await pod.h.call("Exec", shim_pb2.ExecProcessRequest(id="pod", exec_id="e1", stdout=f"file://{out}",
                                                         spec=exec_spec(["cat"])))
    assert (await pod.start("pod", "e1")) == 4242
    assert pod.agent.procs[("pod", "e1")].spec["args"] == ["cat"]
    pod.agent.output("pod", "e1", stdout=b"part1 ")
    await pod.h.call("Kill", shim_pb2.KillRequest(id="pod", exec_id="e1", signal=signal.SIGINT))
    assert await pod.wait("pod", "e1") == 128 + signal.SIGINT
    assert out.read_text() == "part1 "
    await pod.delete("pod", "e1")
    with pytest.raises(NotFound):
        await pod.state("pod", "e1")
    assert pod.sandbox.running                                # the container keeps its VM
    pod.agent.exit("pod")
    await pod.wait("pod")
    await pod.delete("pod")
    assert pod.leftovers() == {}


async def test_two_containers_one_vm(pod: Pod):
    await pod.create("pod")
    await pod.start("pod")
    await pod.create("c2", bundle_kw={"annotations": {"io.kubernetes.cri.sandbox-id": "pod"}})
    assert pod.hv.calls.count("start") == 1
    await pod.start("c2")
    pod.agent.exit("c2", "", 0)
    await pod.wait("c2")
    await pod.delete("c2")
    assert pod.sandbox.running and "c2/rootfs" not in pod.share.binds and "pod/rootfs" in pod.share.binds
    pod.agent.exit("pod", "", 0)
    await pod.wait("pod")
    await pod.delete("pod")
    assert not pod.sandbox.running and pod.leftovers() == {}


async def test_host_mounts_are_shared_read_only_when_the_container_asks(pod: Pod, tmp_path: Path):
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts = [{"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind", "ro"]},
              {"destination": "/rw", "type": "bind", "source": str(vol), "options": ["rbind"]}]
    await pod.create("pod", bundle_kw={"mounts": mounts})
    binds = {k: v for k, v in pod.share.binds.items() if k != "pod/rootfs"}
    assert sorted(binds.values()) == [(str(vol), False), (str(vol), True)]
    guest = {m["destination"]: m["source"] for m in pod.agent.containers["pod"]["mounts"]}
    assert all(src.startswith("/run/kata-containers/shared/containers/pod-") for src in guest.values())
    await pod.delete("pod")
    assert pod.share.binds == {}


async def test_create_container_failure_logs_the_console_and_unshares(pod: Pod, caplog):
    vol = pod.h.tmp / "vol"
    vol.mkdir()
    pod.agent.fail["create_container"] = AgentError("grpc.AgentService/CreateContainer: deadline exceeded")
    caplog.set_level(logging.WARNING, logger="shim.sandbox.containers")
    with pytest.raises(Unavailable, match="deadline exceeded"):  # AgentError on the wire
        await pod.create("pod", bundle_kw={"mounts": [{"destination": "/d", "type": "bind", "source": str(vol),
                                                        "options": ["rbind"]}]})
    assert any("guest kernel says hello" in r.getMessage() for r in caplog.records)
    assert pod.share.binds == {}                              # the rootfs and the volume unshared
    assert "pod" not in pod.h.service.table
    # the sandbox stays up for a retry of the same container (containerd may retry Create)
    pod.agent.fail.clear()
    await pod.create("pod")
    await pod.delete("pod")
    assert pod.leftovers() == {}


async def test_an_invalid_spec_creates_nothing(pod: Pod):
    with pytest.raises(InvalidArgument, match="process.args"):
        await pod.create("pod", [])
    assert pod.sandbox.state is State.NEW and pod.hv.calls == [] and pod.leftovers() == {}


@pytest.mark.parametrize("bug", [ValueError("bad value"), KeyError("missing"), TypeError("wrong type")])
async def test_a_bug_in_the_sandbox_is_internal_with_a_traceback(pod: Pod, caplog, bug: Exception):
    pod.hv.fail["start"] = bug
    with pytest.raises(Internal, match=type(bug).__name__):
        await pod.create("pod")
    records = [r for r in caplog.records if "Create failed" in r.getMessage()]
    assert records and records[0].exc_info is not None and records[0].exc_info[1] is bug
    assert "pod" not in pod.h.service.table and pod.leftovers() == {}
    assert pod.rec.phases("teardown") == ["net", "sharefs"]
    await pod.h.call("Connect", shim_pb2.ConnectRequest(id="pod"), shim_pb2.ConnectResponse)  # still serving


async def test_a_typed_error_is_not_logged_as_a_bug(pod: Pod, caplog):
    pod.hv.fail["start"] = FailedPrecondition("no /dev/kvm and TCG disabled")
    with pytest.raises(FailedPrecondition, match="no /dev/kvm"):
        await pod.create("pod")
    assert not [r for r in caplog.records if "Create failed" in r.getMessage()]


async def test_undecodable_client_input_is_invalid_argument(pod: Pod):
    with pytest.raises(InvalidArgument, match="invalid request payload"):
        await pod.h.client.call_raw("containerd.task.v2.Task", "Create", b"\x0f\xff\xff")
    assert pod.hv.calls == []
    await pod.create("pod")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        await pod.h.call("Exec", shim_pb2.ExecProcessRequest(
            id="pod", exec_id="e1", spec=any_pb2.Any(type_url="x", value=b"{nope")))
    assert "exec_process" not in pod.agent.names()
    await pod.delete("pod")


async def test_cleanup_after_crash_recovers_from_the_journal(pod: Pod, tmp_path: Path):
    await pod.create("pod")
    persisted = pod.ops.persist_data()
    assert persisted == {"sandbox_container": "pod"}
    state = pod.h.service.state_dir
    assert (state / JOURNAL).exists()
    # a fresh process (containerd's `shim delete`) with only the state dir
    fresh = ContainerOps(Sandbox(BackendContext("testns", "pod", str(state))))
    await fresh.cleanup_after_crash("pod", str(tmp_path / "bundles" / "pod"), persisted)
    assert [c.recovered for c in pod.classes] == [[{"path": str(state / "sharefs.obj")}],
                                                  [{"path": str(state / "net.obj")}]]
    assert FakeHypervisor.recovered[-1]["state_dir"] == str(state / "vm")
    assert not list(state.glob("*.obj")) and not (state / "vm").exists() and not (state / JOURNAL).exists()
