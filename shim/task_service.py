"""containerd.task.v2.Task served over ttrpc: runc-shim semantics on top of a :class:`Backend`.

Translation and bookkeeping only: requests become backend calls through :mod:`shim.convert`;
the process table (:mod:`shim.process`) holds statuses and exits and decides which operation is
legal when (``Process.require``); events go through the one ordered
:class:`~shim.events.EventPublisher`. The backend is built once, at construction (shim.cli is the
composition root and shares it with the management server). Semantics follow docs/protocols.md §5: Wait works
before Start and returns immediately for exited processes; Kill of an exited process is
NotFound, of an unstarted exec FailedPrecondition; exec id reuse is AlreadyExists; Delete of an
exec publishes no TaskDelete; Shutdown is a no-op while containers remain.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal as signals
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

from common import version as common_version
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unimplemented
from proto.containerd.task.v2 import shim_pb2
from shim import convert, persist, rootfs
from shim import events as ev
from shim.backend import Backend, BackendContext, BackendFactory, ExitInfo
from shim.process import Container, Op, Process, ProcessTable, Status, now

log = logging.getLogger(__name__)

VERSION = f"kata-colo-{common_version.VERSION}"
EMPTY = empty_pb2.Empty()


def read_spec(bundle: str) -> dict[str, Any]:
    """The bundle's OCI config.json (InvalidArgument when missing or malformed)."""
    try:
        spec = json.loads(Path(bundle, "config.json").read_bytes())
    except FileNotFoundError:
        raise InvalidArgument(f"{bundle}/config.json not found") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{bundle}/config.json: {exc}") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{bundle}/config.json is not a JSON object")
    return spec


class TaskService:
    """One instance per shim daemon; serves every container of one sandbox (group)."""

    def __init__(self, *, namespace: str, sandbox_id: str, backend_factory: BackendFactory,
                 publisher: ev.EventPublisher, state_root: str = persist.STATE_ROOT,
                 config_path: str = "", ttrpc_address: str = "", debug: bool = False,
                 on_shutdown: Callable[[], None] = lambda: None) -> None:
        self.namespace = namespace
        self.sandbox_id = sandbox_id
        self.state_dir = persist.state_dir(sandbox_id, state_root)
        self._publisher = publisher
        self._config_path = config_path
        self._on_shutdown = on_shutdown
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.context = BackendContext(
            namespace=namespace, sandbox_id=sandbox_id, state_dir=str(self.state_dir),
            config_path=config_path, ttrpc_address=ttrpc_address, debug=debug, on_oom=self._on_oom)
        self._backend: Backend = backend_factory(self.context)
        self._table = ProcessTable()
        self._creating: set[str] = set()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.shutdown_requested = False

    # --- helpers ---------------------------------------------------------------------------

    @property
    def table(self) -> ProcessTable:
        return self._table

    @property
    def backend(self) -> Backend:
        return self._backend

    def _require_backend(self) -> Backend:
        return self._backend

    def _on_oom(self, container_id: str) -> None:
        log.info("OOM in container %s", container_id)
        self._publisher.publish(ev.TOPIC_OOM, convert.ev_oom(container_id))

    def _persist(self) -> None:
        state = persist.ShimState(sandbox_id=self.sandbox_id, namespace=self.namespace,
                                  shim_pid=os.getpid())
        for c in self._table.containers():
            state.containers[c.id] = persist.ContainerRecord(
                id=c.id, bundle=c.bundle, pid=c.init.pid, status=c.init.status.name.lower())
        try:
            state.backend = self._backend.persist_data()
        except Exception:  # noqa: BLE001 - never fail an RPC on bookkeeping
            log.exception("backend.persist_data failed")
        try:
            persist.save(self.state_dir, state)
        except OSError:
            log.exception("saving %s failed", self.state_dir)

    def _watch(self, proc: Process) -> None:
        """Start the exit watcher of a process once (after Start, or Kill of a created init)."""
        if proc.watcher is None and proc.exit is None:
            proc.watcher = asyncio.get_running_loop().create_task(
                self._wait_exit(proc), name=f"wait-{proc.container_id}-{proc.exec_id}")

    async def _wait_exit(self, proc: Process) -> None:
        backend = self._require_backend()
        try:
            info = await backend.wait(proc.container_id, proc.exec_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - report the process as lost, never hang waiters
            log.exception("wait %s/%s failed", proc.container_id, proc.exec_id)
            info = ExitInfo(255, now())
        if proc.set_exited(info):
            log.info("%s/%s exited with %d", proc.container_id, proc.exec_id or "init", info.status)
            self._publisher.publish(ev.TOPIC_EXIT, convert.ev_exit(proc))

    # --- lifecycle --------------------------------------------------------------------------

    async def Create(self, req: shim_pb2.CreateTaskRequest, ctx: Any) -> shim_pb2.CreateTaskResponse:
        convert.require_id(req.id)
        if req.id in self._table or req.id in self._creating:
            raise AlreadyExists(f"container {req.id} already exists")
        if req.checkpoint or req.parent_checkpoint:
            raise Unimplemented("checkpoint/restore is not supported")
        self._creating.add(req.id)
        try:
            spec = read_spec(req.bundle) if req.bundle else {}
            opts = convert.create_opts(req, spec, sandbox_id=self.sandbox_id,
                                       config_path=self._config_path)
            backend = self._backend
            bundle_rootfs = Path(req.bundle) / "rootfs"
            mounted = await asyncio.to_thread(rootfs.mount_rootfs, opts.rootfs, bundle_rootfs)
            try:
                pid = await backend.create(opts)
            except BaseException:
                if mounted:
                    await asyncio.to_thread(rootfs.unmount_all, bundle_rootfs)
                raise
            proc = Process(req.id, "", req.bundle, opts.stdio, pid=pid)
            self._table.add_container(Container(req.id, req.bundle, proc))
        finally:
            self._creating.discard(req.id)
        self._persist()
        self._publisher.publish(ev.TOPIC_CREATE, convert.ev_create(opts, pid))
        return shim_pb2.CreateTaskResponse(pid=pid)

    async def Start(self, req: shim_pb2.StartRequest, ctx: Any) -> shim_pb2.StartResponse:
        convert.require_id(req.id)
        container = self._table.container(req.id)
        proc = container.process(req.exec_id)
        async with self._locks[req.id]:
            proc.require(Op.START)
            if req.exec_id:
                container.init.require(Op.EXEC)
            pid = await self._require_backend().start(req.id, req.exec_id)
            proc.pid, proc.status = pid, Status.RUNNING
            if req.exec_id:
                self._publisher.publish(ev.TOPIC_EXEC_STARTED,
                                        convert.ev_exec_started(req.id, req.exec_id, pid))
            else:
                self._publisher.publish(ev.TOPIC_START, convert.ev_start(req.id, pid))
                self._persist()
            self._watch(proc)
        return shim_pb2.StartResponse(pid=pid)

    async def Delete(self, req: shim_pb2.DeleteRequest, ctx: Any) -> shim_pb2.DeleteResponse:
        convert.require_id(req.id)
        container = self._table.container(req.id)
        proc = container.process(req.exec_id)
        async with self._locks[req.id]:
            proc.require(Op.DELETE)
            if not req.exec_id and any(p.exit is None and p.started for p in container.execs.values()):
                raise FailedPrecondition(f"container {req.id} still has running exec processes")
            await self._require_backend().delete(req.id, req.exec_id)
            if proc.exit is None:  # never started: the backend killed it
                proc.set_exited(ExitInfo(128 + signals.SIGKILL, now()))
            if proc.watcher is not None and not proc.watcher.done():
                proc.watcher.cancel()
            if req.exec_id:
                container.execs.pop(req.exec_id, None)
            else:
                await asyncio.to_thread(rootfs.unmount_all, Path(container.bundle) / "rootfs")
                self._table.remove_container(req.id)
                self._locks.pop(req.id, None)
                self._persist()
                self._publisher.publish(ev.TOPIC_DELETE, convert.ev_delete(proc))
        return convert.delete_response(proc.pid, proc.exit)

    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: Any) -> empty_pb2.Empty:
        opts = convert.exec_opts(req)
        proc = Process(req.id, req.exec_id, self._table.container(req.id).bundle, opts.stdio)
        self._table.add_exec(req.id, proc)
        try:
            await self._require_backend().exec(opts)
        except BaseException:
            self._table.container(req.id).execs.pop(req.exec_id, None)
            raise
        self._publisher.publish(ev.TOPIC_EXEC_ADDED, convert.ev_exec_added(req.id, req.exec_id))
        return EMPTY

    async def Kill(self, req: shim_pb2.KillRequest, ctx: Any) -> empty_pb2.Empty:
        convert.require_id(req.id)
        container = self._table.container(req.id)
        proc = container.process(req.exec_id)
        if req.signal > 64:
            raise InvalidArgument(f"invalid signal {req.signal}")
        proc.require(Op.KILL)
        await self._require_backend().kill(req.id, req.exec_id, req.signal, req.all)
        if not req.exec_id and not proc.started:
            self._watch(proc)  # a killed created init exits without Start
        return EMPTY

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: Any) -> shim_pb2.WaitResponse:
        convert.require_id(req.id)
        proc = self._table.process(req.id, req.exec_id)
        await proc.exited.wait()
        assert proc.exit is not None
        return convert.wait_response(proc.exit)

    async def State(self, req: shim_pb2.StateRequest, ctx: Any) -> shim_pb2.StateResponse:
        convert.require_id(req.id)
        return convert.state_response(self._table.process(req.id, req.exec_id))

    # --- container operations ----------------------------------------------------------------

    async def Pids(self, req: shim_pb2.PidsRequest, ctx: Any) -> shim_pb2.PidsResponse:
        convert.require_id(req.id)
        self._table.container(req.id)
        pids = await self._require_backend().pids(req.id)
        return convert.pids_response([(p.pid, p.exec_id) for p in pids])

    async def Pause(self, req: shim_pb2.PauseRequest, ctx: Any) -> empty_pb2.Empty:
        convert.require_id(req.id)
        init = self._table.container(req.id).init
        init.require(Op.PAUSE)
        init.status = Status.PAUSING
        try:
            await self._require_backend().pause(req.id)
        except BaseException:
            init.status = Status.RUNNING if init.exit is None else Status.STOPPED
            raise
        if init.exit is None:
            init.status = Status.PAUSED
        self._publisher.publish(ev.TOPIC_PAUSED, convert.ev_paused(req.id))
        return EMPTY

    async def Resume(self, req: shim_pb2.ResumeRequest, ctx: Any) -> empty_pb2.Empty:
        convert.require_id(req.id)
        init = self._table.container(req.id).init
        init.require(Op.RESUME)
        await self._require_backend().resume(req.id)
        if init.exit is None:
            init.status = Status.RUNNING
        self._publisher.publish(ev.TOPIC_RESUMED, convert.ev_resumed(req.id))
        return EMPTY

    async def Checkpoint(self, req: shim_pb2.CheckpointTaskRequest, ctx: Any) -> empty_pb2.Empty:
        raise Unimplemented("checkpoint is not supported by kata-colo")

    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx: Any) -> empty_pb2.Empty:
        convert.require_id(req.id)
        proc = self._table.process(req.id, req.exec_id)
        proc.require(Op.RESIZE_PTY)
        await self._require_backend().resize_pty(req.id, req.exec_id, req.width, req.height)
        return EMPTY

    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx: Any) -> empty_pb2.Empty:
        convert.require_id(req.id)
        self._table.process(req.id, req.exec_id)
        if req.stdin:
            await self._require_backend().close_io(req.id, req.exec_id)
        return EMPTY

    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx: Any) -> empty_pb2.Empty:
        convert.require_id(req.id)
        self._table.container(req.id)
        resources = convert.resources_from_any(req.resources)
        await self._require_backend().update(req.id, resources, dict(req.annotations))
        return EMPTY

    async def Stats(self, req: shim_pb2.StatsRequest, ctx: Any) -> shim_pb2.StatsResponse:
        convert.require_id(req.id)
        self._table.container(req.id)
        stats = await self._require_backend().stats(req.id)
        return shim_pb2.StatsResponse(stats=convert.stats_any(stats))

    # --- shim ---------------------------------------------------------------------------------

    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: Any) -> shim_pb2.ConnectResponse:
        task_pid = self._table.container(req.id).init.pid if req.id in self._table else 0
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid, version=VERSION)

    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: Any) -> empty_pb2.Empty:
        if len(self._table) or self._creating:
            log.debug("shutdown(%s) ignored: %d container(s) remain", req.id, len(self._table))
            return EMPTY
        if not self.shutdown_requested:
            self.shutdown_requested = True
            log.info("shutdown requested by %s: no container remains", req.id or "?")
            # Let the ttrpc server send this response before the daemon starts closing.
            asyncio.get_running_loop().call_later(0.05, self._on_shutdown)
        return EMPTY

    async def close(self) -> None:
        """Daemon exit: stop the backend (no containers remain, or we were signalled)."""
        for c in self._table.containers():
            for p in c.all_processes():
                if p.watcher is not None:
                    p.watcher.cancel()
        try:
            await asyncio.wait_for(self._backend.shutdown(), 10.0)
        except Exception:  # noqa: BLE001 - exiting anyway
            log.exception("backend shutdown failed")
        if not len(self._table):
            persist.remove(self.state_dir)
