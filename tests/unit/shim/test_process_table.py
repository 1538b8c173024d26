"""The process transition table (shim.process ALLOWED/require), checked exhaustively against
containerd's init_state.go / exec_state.go semantics written out here independently: every
operation × every status, for an init and for an exec process, and the error class of every
illegal transition (runc's codes: FailedPrecondition, NotFound for an exited process)."""
from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from common.errors import AlreadyExists, FailedPrecondition, NotFound
from shim.backend import ExitInfo, Stdio
from shim.process import ALLOWED, Container, Op, Process, ProcessTable, Status

S = Status
LIVE = {S.CREATED, S.RUNNING, S.PAUSING, S.PAUSED}
# (operation, is exec) → statuses in which it is legal
LEGAL: dict[tuple[Op, bool], set[Status]] = {
    (Op.START, False): {S.CREATED}, (Op.START, True): {S.CREATED},
    (Op.DELETE, False): {S.CREATED, S.STOPPED}, (Op.DELETE, True): {S.CREATED, S.STOPPED},
    (Op.KILL, False): LIVE, (Op.KILL, True): {S.RUNNING, S.PAUSING, S.PAUSED},  # an unstarted exec: no
    (Op.PAUSE, False): {S.RUNNING}, (Op.PAUSE, True): {S.RUNNING},
    (Op.RESUME, False): {S.PAUSED}, (Op.RESUME, True): {S.PAUSED},
    (Op.RESIZE_PTY, False): LIVE, (Op.RESIZE_PTY, True): LIVE,
    (Op.EXEC, False): LIVE, (Op.EXEC, True): LIVE,
}
# an exited process is gone for these (runc: "process already finished" → NotFound)
GONE_WHEN_STOPPED = {Op.KILL, Op.RESIZE_PTY}


def proc(status: Status, exec_id: str = "") -> Process:
    return Process("c1", exec_id, "/b", Stdio(), status=status)


def test_the_table_covers_every_operation():
    assert set(ALLOWED) == set(Op)
    assert {op for op, _ in LEGAL} == set(Op)


@pytest.mark.parametrize("op, status, is_exec", list(itertools.product(Op, Status, (False, True))),
                         ids=lambda v: getattr(v, "name", str(v)))
def test_every_transition(op: Op, status: Status, is_exec: bool):
    p = proc(status, "e1" if is_exec else "")
    if status in LEGAL[(op, is_exec)]:
        p.require(op)
        return
    expected = NotFound if status is S.STOPPED and op in GONE_WHEN_STOPPED else FailedPrecondition
    with pytest.raises(expected) as err:
        p.require(op)
    assert type(err.value) is expected
    name = "e1" if is_exec else "c1"
    assert name in str(err.value)
    if expected is FailedPrecondition and op is not Op.START:
        assert status.name.lower() in str(err.value)  # the message says which state it is in


def test_messages_follow_runc():
    with pytest.raises(FailedPrecondition, match="already started"):
        proc(S.RUNNING).require(Op.START)
    with pytest.raises(FailedPrecondition, match="must be stopped before deletion"):
        proc(S.RUNNING).require(Op.DELETE)
    with pytest.raises(NotFound, match="already finished"):
        proc(S.STOPPED).require(Op.KILL)
    with pytest.raises(FailedPrecondition, match="cannot kill process e1: it is created"):
        proc(S.CREATED, "e1").require(Op.KILL)


def test_exit_is_recorded_once():
    p = proc(S.RUNNING)
    first = ExitInfo(3, datetime.now(UTC))
    assert p.set_exited(first) and p.status is S.STOPPED and p.exited.is_set()
    assert not p.set_exited(ExitInfo(255, datetime.now(UTC)))
    assert p.exit is first


def test_table_lookups_and_exec_rules():
    table = ProcessTable()
    c = Container("c1", "/b", proc(S.CREATED))
    table.add_container(c)
    with pytest.raises(AlreadyExists):
        table.add_container(Container("c1", "/b", proc(S.CREATED)))
    with pytest.raises(NotFound):
        table.container("nope")
    with pytest.raises(NotFound, match="process e9 does not exist in container c1"):
        table.process("c1", "e9")
    table.add_exec("c1", proc(S.CREATED, "e1"))
    with pytest.raises(AlreadyExists):
        table.add_exec("c1", proc(S.CREATED, "e1"))
    assert table.process("c1", "e1").exec_id == "e1" and table.process("c1", "") is c.init
    c.init.set_exited(ExitInfo(0, datetime.now(UTC)))
    with pytest.raises(FailedPrecondition, match="cannot exec in process c1: it is stopped"):
        table.add_exec("c1", proc(S.CREATED, "e2"))
    assert [p.name for p in c.all_processes()] == ["c1", "e1"]
    table.remove_container("c1")
    assert "c1" not in table and len(table) == 0
