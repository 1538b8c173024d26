"""Task service semantics (docs/protocols.md §5) with the host test backend over a real ttrpc
connection; events are received by a capture Events server through the real publisher."""
from __future__ import annotations

import asyncio
import json
import signal

import pytest
from google.protobuf import any_pb2

from common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from proto.containerd.cgroups.v1 import metrics_pb2
from proto.containerd.task.v2 import shim_pb2
from shim.process import Status

pytestmark = pytest.mark.asyncio


def exec_spec(args: list[str]) -> any_pb2.Any:
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps({"args": args, "env": ["PATH=/usr/bin:/bin"],
                                         "cwd": "/"}).encode())


async def test_lifecycle_output_exit_code_and_event_order(shim):
    created = await shim.create("c1", ["sh", "-c", "echo hello; exit 7"])
    assert created.pid > 0
    waiter = asyncio.ensure_future(shim.call("Wait", shim_pb2.WaitRequest(id="c1"),
                                             shim_pb2.WaitResponse))
    await asyncio.sleep(0.05)
    assert not waiter.done(), "Wait before Start must block"
    state = await shim.call("State", shim_pb2.StateRequest(id="c1"), shim_pb2.StateResponse)
    assert state.status == Status.CREATED and state.pid == created.pid
    started = await shim.call("Start", shim_pb2.StartRequest(id="c1"), shim_pb2.StartResponse)
    assert started.pid == created.pid
    waited = await asyncio.wait_for(waiter, 5)
    assert waited.exit_status == 7 and waited.exited_at.seconds > 0
    again = await shim.call("Wait", shim_pb2.WaitRequest(id="c1"), shim_pb2.WaitResponse)
    assert again == waited  # immediate once exited
    state = await shim.call("State", shim_pb2.StateRequest(id="c1"), shim_pb2.StateResponse)
    assert state.status == Status.STOPPED and state.exit_status == 7
    deleted = await shim.call("Delete", shim_pb2.DeleteRequest(id="c1"), shim_pb2.DeleteResponse)
    assert deleted.exit_status == 7 and deleted.pid == created.pid
    assert shim.output("c1") == "hello\n"
    await shim.sink.wait_for(4)
    assert shim.sink.topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    decoded = dict(shim.sink.decoded())
    assert decoded["/tasks/exit"].exit_status == 7 and decoded["/tasks/exit"].id == "c1"
    assert decoded["/tasks/delete"].pid == created.pid
    assert all(e.namespace == "testns" and e.timestamp.seconds > 0 for e in shim.sink.envelopes)
    assert shim.sink.envelopes[2].event.type_url == "containerd.events.TaskExit"
    with pytest.raises(NotFound):
        await shim.call("State", shim_pb2.StateRequest(id="c1"), shim_pb2.StateResponse)


async def test_wait_unknown_is_not_found(shim):
    with pytest.raises(NotFound):
        await shim.call("Wait", shim_pb2.WaitRequest(id="nope"), shim_pb2.WaitResponse)


async def test_kill_running_then_exited_is_not_found(shim):
    await shim.create("k", ["sleep", "100"])
    await shim.call("Start", shim_pb2.StartRequest(id="k"), shim_pb2.StartResponse)
    with pytest.raises(FailedPrecondition):  # running: cannot delete
        await shim.call("Delete", shim_pb2.DeleteRequest(id="k"), shim_pb2.DeleteResponse)
    await shim.call("Kill", shim_pb2.KillRequest(id="k", signal=signal.SIGKILL))
    w = await shim.call("Wait", shim_pb2.WaitRequest(id="k"), shim_pb2.WaitResponse)
    assert w.exit_status == 128 + signal.SIGKILL
    with pytest.raises(NotFound):
        await shim.call("Kill", shim_pb2.KillRequest(id="k", signal=signal.SIGTERM))
    await shim.call("Delete", shim_pb2.DeleteRequest(id="k"), shim_pb2.DeleteResponse)


async def test_exec_semantics(shim):
    await shim.create("e", ["sleep", "100"])
    await shim.call("Start", shim_pb2.StartRequest(id="e"), shim_pb2.StartResponse)
    out = shim.tmp / "x1.out"
    req = shim_pb2.ExecProcessRequest(id="e", exec_id="x1", stdout=f"file://{out}",
                                      spec=exec_spec(["sh", "-c", "echo from-exec; exit 3"]))
    await shim.call("Exec", req)
    with pytest.raises(AlreadyExists):
        await shim.call("Exec", req)
    with pytest.raises(FailedPrecondition):  # kill of an unstarted exec
        await shim.call("Kill", shim_pb2.KillRequest(id="e", exec_id="x1", signal=9))
    waiter = asyncio.ensure_future(shim.call("Wait", shim_pb2.WaitRequest(id="e", exec_id="x1"),
                                             shim_pb2.WaitResponse))
    st = await shim.call("Start", shim_pb2.StartRequest(id="e", exec_id="x1"), shim_pb2.StartResponse)
    assert st.pid > 0
    assert (await asyncio.wait_for(waiter, 5)).exit_status == 3
    state = await shim.call("State", shim_pb2.StateRequest(id="e", exec_id="x1"),
                            shim_pb2.StateResponse)
    assert state.exec_id == "x1" and state.status == Status.STOPPED and state.exit_status == 3
    d = await shim.call("Delete", shim_pb2.DeleteRequest(id="e", exec_id="x1"),
                        shim_pb2.DeleteResponse)
    assert d.exit_status == 3
    assert out.read_text() == "from-exec\n"
    with pytest.raises(NotFound):
        await shim.call("State", shim_pb2.StateRequest(id="e", exec_id="x1"), shim_pb2.StateResponse)
    await shim.call("Kill", shim_pb2.KillRequest(id="e", signal=9, all=True))
    await shim.call("Wait", shim_pb2.WaitRequest(id="e"), shim_pb2.WaitResponse)
    await shim.call("Delete", shim_pb2.DeleteRequest(id="e"), shim_pb2.DeleteResponse)
    await shim.sink.wait_for(7)
    topics = shim.sink.topics
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                      "/tasks/exec-started", "/tasks/exit", "/tasks/exit", "/tasks/delete"]
    decoded = shim.sink.decoded()
    assert decoded[4][1].id == "x1" and decoded[4][1].exit_status == 3
    assert sum(1 for t, m in decoded if t == "/tasks/delete") == 1  # none for the exec


async def test_shutdown_is_noop_while_containers_remain(shim):
    await shim.create("s", ["sleep", "100"])
    await shim.call("Shutdown", shim_pb2.ShutdownRequest(id="s"))
    await asyncio.sleep(0.1)
    assert shim.shutdowns == [] and not shim.service.shutdown_requested
    await shim.call("Delete", shim_pb2.DeleteRequest(id="s"), shim_pb2.DeleteResponse)
    await shim.call("Shutdown", shim_pb2.ShutdownRequest(id="s"))
    await asyncio.sleep(0.15)
    assert shim.shutdowns == [1]


async def test_delete_unstarted_container_reports_killed(shim):
    created = await shim.create("u", ["sleep", "100"])
    waiter = asyncio.ensure_future(shim.call("Wait", shim_pb2.WaitRequest(id="u"),
                                             shim_pb2.WaitResponse))
    d = await shim.call("Delete", shim_pb2.DeleteRequest(id="u"), shim_pb2.DeleteResponse)
    assert d.pid == created.pid and d.exit_status == 137
    assert (await asyncio.wait_for(waiter, 5)).exit_status == 137


async def test_pause_resume_pids_stats_update_connect(shim):
    c = await shim.create("p", ["sleep", "100"])
    await shim.call("Start", shim_pb2.StartRequest(id="p"), shim_pb2.StartResponse)
    await shim.call("Pause", shim_pb2.PauseRequest(id="p"))
    st = await shim.call("State", shim_pb2.StateRequest(id="p"), shim_pb2.StateResponse)
    assert st.status == Status.PAUSED
    with pytest.raises(FailedPrecondition):
        await shim.call("Pause", shim_pb2.PauseRequest(id="p"))
    await shim.call("Resume", shim_pb2.ResumeRequest(id="p"))
    pids = await shim.call("Pids", shim_pb2.PidsRequest(id="p"), shim_pb2.PidsResponse)
    assert [p.pid for p in pids.processes] == [c.pid]
    m = metrics_pb2.Metrics()
    for _ in range(100):  # the resumed child may still be between fork and exec (rss reads 0)
        stats = await shim.call("Stats", shim_pb2.StatsRequest(id="p"), shim_pb2.StatsResponse)
        assert stats.stats.type_url == "io.containerd.cgroups.v1.Metrics"
        m.ParseFromString(stats.stats.value)
        if m.memory.usage.usage > 0:
            break
        await asyncio.sleep(0.02)
    assert m.memory.usage.usage > 0 and m.pids.current == 1
    res = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                      value=b'{"cpu": {"shares": 512}}')
    await shim.call("Update", shim_pb2.UpdateTaskRequest(id="p", resources=res,
                                                         annotations={"a": "b"}))
    assert shim.service._backend.updates == [("p", {"cpu": {"shares": 512}}, {"a": "b"})]
    conn = await shim.call("Connect", shim_pb2.ConnectRequest(id="p"), shim_pb2.ConnectResponse)
    assert conn.task_pid == c.pid and conn.shim_pid > 0
    await shim.call("Kill", shim_pb2.KillRequest(id="p", signal=9))
    await shim.call("Wait", shim_pb2.WaitRequest(id="p"), shim_pb2.WaitResponse)
    await shim.call("Delete", shim_pb2.DeleteRequest(id="p"), shim_pb2.DeleteResponse)
    await shim.sink.wait_for(6)
    assert shim.sink.topics[:4] == ["/tasks/create", "/tasks/start", "/tasks/paused",
                                    "/tasks/resumed"]


async def test_oom_event(shim):
    await shim.create("o", ["sleep", "100"])
    shim.service._backend.simulate_oom("o")
    await shim.sink.wait_for(2)
    topic, msg = shim.sink.decoded()[1]
    assert topic == "/tasks/oom" and msg.container_id == "o"
    await shim.call("Delete", shim_pb2.DeleteRequest(id="o"), shim_pb2.DeleteResponse)


async def test_invalid_requests(shim):
    with pytest.raises(InvalidArgument):
        await shim.call("State", shim_pb2.StateRequest(id=""), shim_pb2.StateResponse)
    with pytest.raises(InvalidArgument):
        await shim.call("Create", shim_pb2.CreateTaskRequest(id="../x", bundle="/tmp"),
                        shim_pb2.CreateTaskResponse)
    with pytest.raises(InvalidArgument):  # bundle without config.json
        await shim.call("Create", shim_pb2.CreateTaskRequest(id="nb", bundle=str(shim.tmp)),
                        shim_pb2.CreateTaskResponse)
    # bytes that are not a CreateTaskRequest (field 1 with wire type 7 is invalid)
    with pytest.raises(InvalidArgument):
        await shim.client.call_raw("containerd.task.v2.Task", "Create", b"\x0f\xff\xff")
    await shim.create("v", ["sleep", "100"])
    with pytest.raises(AlreadyExists):
        await shim.create("v", ["sleep", "100"])
    await shim.call("Start", shim_pb2.StartRequest(id="v"), shim_pb2.StartResponse)
    with pytest.raises(InvalidArgument):  # exec spec is not JSON
        await shim.call("Exec", shim_pb2.ExecProcessRequest(
            id="v", exec_id="bad", spec=any_pb2.Any(type_url="x", value=b"{nope")))
    with pytest.raises(InvalidArgument):
        await shim.call("Kill", shim_pb2.KillRequest(id="v", signal=999))
    with pytest.raises(Unimplemented):
        await shim.call("Checkpoint", shim_pb2.CheckpointTaskRequest(id="v", path="/x"))
    with pytest.raises(FailedPrecondition):
        await shim.call("Start", shim_pb2.StartRequest(id="v"), shim_pb2.StartResponse)
    await shim.call("Kill", shim_pb2.KillRequest(id="v", signal=9))
    await shim.call("Wait", shim_pb2.WaitRequest(id="v"), shim_pb2.WaitResponse)
    with pytest.raises(FailedPrecondition):  # exec into an exited container
        await shim.call("Exec", shim_pb2.ExecProcessRequest(id="v", exec_id="late",
                                                            spec=exec_spec(["true"])))
    await shim.call("Delete", shim_pb2.DeleteRequest(id="v"), shim_pb2.DeleteResponse)


async def test_our_bug_in_the_backend_is_internal_and_the_shim_keeps_serving(shim, caplog):
    async def broken(opts):
        raise KeyError("a bug of ours")

    shim.service.backend.create = broken  # type: ignore[method-assign]
    with pytest.raises(Internal, match="KeyError"):
        await shim.create("nb", ["true"])
    assert "nb" not in shim.service.table
    assert any("Create failed" in r.getMessage() and r.exc_info for r in caplog.records)  # traceback logged
    await shim.call("Shutdown", shim_pb2.ShutdownRequest(id="nb"))  # still serving
    await asyncio.sleep(0.1)
    assert shim.shutdowns == [1]


async def test_product_factory_without_vm_backend_is_unavailable(monkeypatch):
    import sys

    from shim import cli
    from shim.backend import BackendContext

    monkeypatch.setitem(sys.modules, "shim.sandbox.containers", None)  # import fails
    with pytest.raises(Unavailable):
        cli._load_factory(None)(BackendContext("ns", "sb", "/tmp/x"))
