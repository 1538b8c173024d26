"""Protobuf <-> internal dataclasses. The only module of the shim (with the task service's
request/response plumbing) that knows message types; backends never see protobuf."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2

from common.errors import InvalidArgument
from common.ids import check_id
from proto.containerd.cgroups.v1 import metrics_pb2
from proto.containerd.events import task_pb2 as events_pb2
from proto.containerd.task.v2 import shim_pb2
from proto.runtimeoptions.v1 import options_pb2
from shim.backend import CreateOpts, ExecOpts, ExitInfo, Mount, Stats, Stdio
from shim.process import Process

#: Go's time.Time{} marshalled as a Timestamp: "unset".
GO_ZERO_SECONDS = -62135596800
PROCESS_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
METRICS_V1_TYPE = "io.containerd.cgroups.v1.Metrics"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"


# --- time -------------------------------------------------------------------------------

def ts_to_datetime(ts: timestamp_pb2.Timestamp) -> datetime | None:
    """Timestamp -> aware UTC datetime; the empty message and Go's zero time mean None."""
    if ts.seconds == GO_ZERO_SECONDS and ts.nanos == 0:
        return None
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return datetime.fromtimestamp(ts.seconds, tz=UTC).replace(microsecond=ts.nanos // 1000)


def datetime_to_ts(dt: datetime | None, out: timestamp_pb2.Timestamp | None = None
                   ) -> timestamp_pb2.Timestamp:
    """Aware datetime -> Timestamp (None -> Go's zero time, as runc's shim sends it)."""
    ts = out if out is not None else timestamp_pb2.Timestamp()
    if dt is None:
        ts.seconds, ts.nanos = GO_ZERO_SECONDS, 0
        return ts
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    delta = dt - epoch
    seconds = delta.days * 86400 + delta.seconds
    ts.seconds, ts.nanos = seconds, delta.microseconds * 1000
    return ts


# --- requests -> dataclasses ---------------------------------------------------------------

def require_id(value: str, what: str = "id") -> str:
    """A container or exec id from containerd, by the one id rule (:mod:`common.ids`)."""
    return check_id(value, what)


def mounts_from_pb(mounts: Any) -> tuple[Mount, ...]:
    return tuple(Mount(m.type, m.source, m.target, tuple(m.options)) for m in mounts)


def mounts_to_pb(mounts: tuple[Mount, ...], out: Any) -> None:
    for m in mounts:
        out.add(type=m.type, source=m.source, target=m.target, options=list(m.options))


def create_opts(req: shim_pb2.CreateTaskRequest, spec: dict[str, Any], *, sandbox_id: str,
                config_path: str) -> CreateOpts:
    require_id(req.id)
    if not req.bundle:
        raise InvalidArgument("bundle must not be empty")
    return CreateOpts(
        id=req.id, bundle=req.bundle, spec=spec,
        stdio=Stdio(req.stdin, req.stdout, req.stderr, req.terminal),
        rootfs=mounts_from_pb(req.rootfs), sandbox_id=sandbox_id, config_path=config_path,
        checkpoint=req.checkpoint)


def _json_any(value: any_pb2.Any, what: str) -> dict[str, Any]:
    if not value.value:
        raise InvalidArgument(f"{what} is empty")
    try:
        parsed = json.loads(value.value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return parsed


def exec_opts(req: shim_pb2.ExecProcessRequest) -> ExecOpts:
    require_id(req.id)
    require_id(req.exec_id, "exec_id")
    spec = _json_any(req.spec, "exec process spec")
    args = spec.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("exec process spec needs non-empty string args")
    return ExecOpts(req.id, req.exec_id, spec, Stdio(req.stdin, req.stdout, req.stderr, req.terminal))


def resources_from_any(value: any_pb2.Any) -> dict[str, Any]:
    if not value.value and not value.type_url:
        return {}
    return _json_any(value, "resources")


def runtime_config_path(raw: bytes) -> str:
    """ConfigPath from the serialized Any containerd writes on `start`'s stdin ('' if none)."""
    if not raw:
        return ""
    outer = any_pb2.Any()
    outer.ParseFromString(raw)  # DecodeError -> InvalidArgument through to_status
    if not outer.type_url.endswith(RUNTIME_OPTIONS_TYPE):
        return ""
    opts = options_pb2.Options()
    opts.ParseFromString(outer.value)
    return opts.config_path


# --- dataclasses -> responses ----------------------------------------------------------------

def state_response(p: Process) -> shim_pb2.StateResponse:
    resp = shim_pb2.StateResponse(
        id=p.container_id, exec_id=p.exec_id, bundle=p.bundle, pid=p.pid,
        status=int(p.status),  # type: ignore[arg-type]  # the enum value is the wire int
        stdin=p.stdio.stdin, stdout=p.stdio.stdout,
        stderr=p.stdio.stderr, terminal=p.stdio.terminal)
    if p.exit is not None:
        resp.exit_status = p.exit.status
        datetime_to_ts(p.exit.exited_at, resp.exited_at)
    return resp


def wait_response(info: ExitInfo) -> shim_pb2.WaitResponse:
    resp = shim_pb2.WaitResponse(exit_status=info.status)
    datetime_to_ts(info.exited_at, resp.exited_at)
    return resp


def delete_response(pid: int, info: ExitInfo | None) -> shim_pb2.DeleteResponse:
    resp = shim_pb2.DeleteResponse(pid=pid)
    if info is not None:
        resp.exit_status = info.status
    datetime_to_ts(info.exited_at if info else None, resp.exited_at)
    return resp


def pids_response(pids: list[tuple[int, str]]) -> shim_pb2.PidsResponse:
    resp = shim_pb2.PidsResponse()
    for pid, _exec_id in pids:
        resp.processes.add(pid=pid)
    return resp


def stats_any(stats: Stats) -> any_pb2.Any:
    m = metrics_pb2.Metrics()
    m.cpu.usage.total = stats.cpu_usage_ns
    m.cpu.usage.user = stats.cpu_user_ns
    m.cpu.usage.kernel = stats.cpu_kernel_ns
    m.memory.usage.usage = stats.memory_usage
    m.memory.usage.limit = stats.memory_limit
    m.memory.rss = m.memory.total_rss = stats.memory_rss
    m.memory.cache = m.memory.total_cache = stats.memory_cache
    m.memory.inactive_file = m.memory.total_inactive_file = stats.memory_inactive_file
    m.memory.pg_fault = m.memory.total_pg_fault = stats.pg_fault
    m.memory.pg_maj_fault = m.memory.total_pg_maj_fault = stats.pg_maj_fault
    m.pids.current = stats.pids_current
    m.pids.limit = stats.pids_limit
    return any_pb2.Any(type_url=METRICS_V1_TYPE, value=m.SerializeToString())


# --- events --------------------------------------------------------------------------------

def ev_create(opts: CreateOpts, pid: int) -> events_pb2.TaskCreate:
    ev = events_pb2.TaskCreate(container_id=opts.id, bundle=opts.bundle, pid=pid,
                               checkpoint=opts.checkpoint)
    ev.io.stdin, ev.io.stdout, ev.io.stderr = opts.stdio.stdin, opts.stdio.stdout, opts.stdio.stderr
    ev.io.terminal = opts.stdio.terminal
    mounts_to_pb(opts.rootfs, ev.rootfs)
    return ev


def ev_start(container_id: str, pid: int) -> events_pb2.TaskStart:
    return events_pb2.TaskStart(container_id=container_id, pid=pid)


def ev_exit(p: Process) -> events_pb2.TaskExit:
    assert p.exit is not None
    ev = events_pb2.TaskExit(container_id=p.container_id, id=p.exec_id or p.container_id,
                             pid=p.pid, exit_status=p.exit.status)
    datetime_to_ts(p.exit.exited_at, ev.exited_at)
    return ev


def ev_delete(p: Process) -> events_pb2.TaskDelete:
    ev = events_pb2.TaskDelete(container_id=p.container_id, pid=p.pid)
    if p.exit is not None:
        ev.exit_status = p.exit.status
    datetime_to_ts(p.exit.exited_at if p.exit else None, ev.exited_at)
    return ev


def ev_exec_added(container_id: str, exec_id: str) -> events_pb2.TaskExecAdded:
    return events_pb2.TaskExecAdded(container_id=container_id, exec_id=exec_id)


def ev_exec_started(container_id: str, exec_id: str, pid: int) -> events_pb2.TaskExecStarted:
    return events_pb2.TaskExecStarted(container_id=container_id, exec_id=exec_id, pid=pid)


def ev_oom(container_id: str) -> events_pb2.TaskOOM:
    return events_pb2.TaskOOM(container_id=container_id)


def ev_paused(container_id: str) -> events_pb2.TaskPaused:
    return events_pb2.TaskPaused(container_id=container_id)


def ev_resumed(container_id: str) -> events_pb2.TaskResumed:
    return events_pb2.TaskResumed(container_id=container_id)
