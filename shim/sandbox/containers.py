"""ContainerOps: the product :class:`~shim.backend.Backend` — containers and processes of one pod,
run by the guest agent in the pod's :class:`~shim.sandbox.sandbox.Sandbox`.

The first Create starts the sandbox. Every container's storage comes from the rootfs provider
(:class:`~shim.resources.blockdev.provider.StorageProvider`): a block rootfs (cached read-only
layer images + a scratch disk, assembled by the agent) where it works, else its rootfs (mounted on
its bundle by the task service) bound into the 9p share, plus its data disks and VFIO devices.
Host files and volumes are bound into the share (``nosuid,nodev``; the container's read-only
volumes read-only on the host side too), its OCI spec is rewritten for the guest
(:mod:`shim.sandbox.oci_guest`) and the agent creates it; stdio
is copied between containerd's endpoints and the agent's stream calls. Only mechanism lives here
(stdio, shared files, the guest spec): statuses are the task service's process table. When the
VM dies, the agent connection drops and every waiting process is reported exited with 255.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from common.errors import AlreadyExists, InvalidArgument, KataColoError, NotFound, Unimplemented
from common.ids import check_id
from shim import stdio as stdio_mod
from shim.backend import BackendContext, CreateOpts, ExecOpts, ExitInfo, ProcessPid, Stats, Stdio
from shim.resources.blockdev.provider import StorageProvider
from shim.resources.sharefs import Virtio9pShare
from shim.resources.sharefs.ninep import SHARE_DIR
from shim.sandbox import oci_guest
from shim.sandbox import sandbox as sandbox_mod
from shim.sandbox.sandbox import Sandbox, State
from shim.stdio import ProcessIO

log = logging.getLogger(__name__)

EXIT_VM_GONE = 255
EXIT_KILLED = 128 + signal.SIGKILL
OUTPUT_DRAIN_TIMEOUT = 30.0
READ_CHUNK = 32 * 1024


@dataclass
class _Proc:
    """Mechanism of one process: its stdio URIs, OCI process and, once started, its copier."""

    stdio: Stdio
    spec: dict[str, Any]
    io: ProcessIO | None = None


@dataclass
class _Container:
    id: str
    bundle: str
    procs: dict[str, _Proc] = field(default_factory=dict)
    shared_files: list[str] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


def memory_limit(resources: dict[str, Any]) -> int | None:
    """The OCI LinuxResources memory limit in bytes (None = not set; ≤ 0 = unlimited → 0)."""
    memory = resources.get("memory") if isinstance(resources, dict) else None
    if not isinstance(memory, dict) or "limit" not in memory:
        return None
    value = memory["limit"]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"memory.limit must be an integer, not {str(value)[:32]!r}")
    return max(0, value)


class ContainerOps:
    """Implements shim.backend.Backend on top of one Sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.containers: dict[str, _Container] = {}
        self.sandbox_container = ""
        self.storage = StorageProvider(sandbox)
        self._boot_lock = asyncio.Lock()
        self.memory_limits: dict[str, int] = {}  # container → OCI memory limit (bytes)

    @classmethod
    def from_context(cls, ctx: BackendContext) -> ContainerOps:
        """The product backend factory (shim.cli's composition root)."""
        return cls(Sandbox(ctx))

    # -- helpers ------------------------------------------------------------------------------

    def _container(self, cid: str) -> _Container:
        c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid} not found")
        return c

    def _proc(self, cid: str, eid: str) -> _Proc:
        c = self.containers.get(cid)
        if c is None or eid not in c.procs:
            raise NotFound(f"process {cid}/{eid or 'init'} not found")
        return c.procs[eid]

    def _pid(self) -> int:
        return self.sandbox.vmm_pid() or os.getpid()

    def _share(self) -> Virtio9pShare | None:
        res = self.sandbox.resource("sharefs")
        return res.share if res is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def create(self, opts: CreateOpts) -> int:
        check_id(opts.id, "container id")
        spec = oci_guest.validate(opts.spec)
        if opts.id in self.containers:
            raise AlreadyExists(f"container {opts.id} already exists")
        async with self._boot_lock:
            if self.sandbox.state is State.NEW:
                self.sandbox_container = opts.id
                await self.storage.before_boot(opts, spec)
                try:
                    await self.sandbox.start(opts)
                finally:
                    self.storage.boot_done(opts)
                self.sandbox.spawn(self._forward_ooms())
        agent = self.sandbox.require_agent()
        container = _Container(opts.id, opts.bundle)
        share = self._share()
        try:
            # root.readonly is the guest's to enforce (runc makes mount points in the rootfs first,
            # then remounts it read-only); the rootfs is the container's own overlay anyway
            rootfs = await self.storage.attach(opts, spec, share)
            view = rootfs.view

            def share_file(src: str, name: str, ro: bool) -> str:
                if share is None:
                    raise Unimplemented(f"sandbox {self.sandbox.id} has no shared filesystem for {src}")
                container.shared_files.append(name)
                return share.share_path(src, name, ro)

            guest_spec = await asyncio.to_thread(oci_guest.to_guest, spec, opts.id, view.root_path, share_file,
                                                 volumes=view.volumes, keep_devices=view.keep_devices)
            try:
                await agent.create_container(opts.id, guest_spec, storages=view.storages, devices=view.devices)
            except KataColoError as exc:
                log.warning("container %s: CreateContainer failed: %s; guest console (tail):\n%s",
                            opts.id, exc, self.sandbox.console_tail())
                raise
        except BaseException:
            await self._release(container)
            raise
        container.procs[""] = _Proc(opts.stdio, spec["process"])
        self.containers[opts.id] = container
        limit = memory_limit(dict(spec.get("linux") or {}).get("resources") or {})
        if limit:
            self.memory_limits[opts.id] = limit  # counted when an Update resizes the VM
        return self._pid()

    async def _release(self, container: _Container) -> None:
        """Undo a container's storage (rootfs, disks, devices) and shared files."""
        share = self._share()
        try:
            await self.storage.release(container.id, share)
        finally:
            if share is not None:
                await asyncio.to_thread(self._unshare, share, container)

    @staticmethod
    def _unshare(share: Virtio9pShare, container: _Container) -> None:
        for name in container.shared_files:
            share.unshare_path(name)

    async def _forward_ooms(self) -> None:
        agent = self.sandbox.agent
        while agent is not None and self.sandbox.running:
            try:
                cid = await agent.next_oom()
            except KataColoError:
                return
            if cid in self.containers:
                self.sandbox.ctx.on_oom(cid)

    async def exec(self, opts: ExecOpts) -> None:
        c = self._container(opts.id)
        if opts.exec_id in c.procs:
            raise AlreadyExists(f"exec {opts.exec_id} already exists")
        check_id(opts.exec_id, "exec id")
        c.procs[opts.exec_id] = _Proc(opts.stdio, oci_guest.process_from_exec(opts.spec))

    async def start(self, container_id: str, exec_id: str) -> int:
        p = self._proc(container_id, exec_id)
        agent = self.sandbox.require_agent()
        io = ProcessIO(stdio_mod.validate(p.stdio), self.sandbox.ctx.namespace, container_id)
        if exec_id:
            await agent.exec_process(container_id, exec_id, p.spec)
        else:
            await agent.start_container(container_id)
        p.io = io  # from here on the process runs in the guest
        gid = exec_id  # the agent names the init process by an empty exec id

        async def read_out() -> bytes:
            return await agent.read_stdout(container_id, gid, READ_CHUNK)

        async def read_err() -> bytes:
            return await agent.read_stderr(container_id, gid, READ_CHUNK)

        async def write_in(data: bytes) -> None:
            await agent.write_stdin(container_id, gid, data)

        async def close_in() -> None:
            await agent.close_stdin(container_id, gid)

        await io.start(read_out, None if p.stdio.terminal else read_err, write_in, close_in)
        return self._pid()

    async def wait(self, container_id: str, exec_id: str) -> ExitInfo:
        p = self._proc(container_id, exec_id)
        if p.io is None:
            # The task service waits only for started processes and for a created init it
            # killed (kill SIGKILLs it in the guest): never started means killed.
            return ExitInfo(EXIT_KILLED, _now())
        agent = self.sandbox.agent
        status = EXIT_VM_GONE
        if agent is not None and not self.sandbox.vm_gone.is_set():
            try:
                status = await agent.wait_process(container_id, exec_id)
            except KataColoError as exc:
                log.warning("wait %s/%s: %s (reporting %d)", container_id, exec_id, exc, EXIT_VM_GONE)
        # containerd deletes the process (and we stop copying) right after the exit event: all
        # output must be delivered first. The bound only guards against a guest that never
        # reports EOF (a child still holding stdout); a loaded TCG guest can be slow.
        await p.io.wait_output(timeout=OUTPUT_DRAIN_TIMEOUT)
        return ExitInfo(status, _now())

    async def kill(self, container_id: str, exec_id: str, signal_: int, all: bool) -> None:
        p = self._proc(container_id, exec_id)
        if p.io is None:  # a created init: runc's init waits on its exec fifo in the guest
            if self.sandbox.running and self.sandbox.agent is not None:
                with contextlib.suppress(KataColoError):
                    await self.sandbox.agent.signal_process(container_id, "", signal.SIGKILL)
            return
        await self.sandbox.require_agent().signal_process(container_id, exec_id, signal_, all_processes=all)

    async def delete(self, container_id: str, exec_id: str) -> None:
        c = self.containers.get(container_id)
        if c is None:
            return
        if exec_id:
            p = c.procs.pop(exec_id, None)
            if p is not None and p.io is not None:
                await p.io.close()
            return
        for p in c.procs.values():
            if p.io is not None:
                await p.io.close()
        if self.sandbox.running and self.sandbox.agent is not None:
            with contextlib.suppress(KataColoError):
                await self.sandbox.agent.remove_container(container_id)
        del self.containers[container_id]
        self.memory_limits.pop(container_id, None)
        try:
            await self._release(c)
        finally:
            if not self.containers or container_id == self.sandbox_container:
                await self.shutdown()

    async def pids(self, container_id: str) -> list[ProcessPid]:
        self._proc(container_id, "")
        return [ProcessPid(self._pid(), "")]

    async def pause(self, container_id: str) -> None:
        self._proc(container_id, "")
        await self.sandbox.require_agent().pause_container(container_id)

    async def resume(self, container_id: str) -> None:
        self._proc(container_id, "")
        await self.sandbox.require_agent().resume_container(container_id)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        self._proc(container_id, exec_id)
        await self.sandbox.require_agent().resize_tty(container_id, exec_id, width, height)

    async def close_io(self, container_id: str, exec_id: str) -> None:
        p = self._proc(container_id, exec_id)
        if p.io is not None:
            await p.io.close_stdin()

    async def update(self, container_id: str, resources: dict[str, Any], annotations: dict[str, str]) -> None:
        """The guest applies ``resources`` to the container; a memory limit first grows the VM
        to ``default_memory`` + every container's limit (kata's updateResources)."""
        self._proc(container_id, "")
        if not isinstance(resources, dict):
            raise InvalidArgument("resources must be a JSON object")
        agent = self.sandbox.require_agent()
        limit = memory_limit(resources)
        if limit is not None:
            limits = {**self.memory_limits, container_id: limit}
            await self.sandbox.grow_memory_for_containers(sum(limits.values()))
            self.memory_limits[container_id] = limit
        await agent.update_container(container_id, resources)

    async def stats(self, container_id: str) -> Stats:
        self._proc(container_id, "")
        return await self.sandbox.require_agent().stats(container_id)

    async def shutdown(self) -> None:
        for c in list(self.containers.values()):
            for p in c.procs.values():
                if p.io is not None:
                    await p.io.close()
        await self.sandbox.stop()

    # -- crash recovery -----------------------------------------------------------------------

    def persist_data(self) -> dict[str, Any]:
        return {"sandbox_container": self.sandbox_container}

    async def cleanup_after_crash(self, container_id: str, bundle: str, persisted: dict[str, Any] | None) -> None:
        data = persisted or {}
        whole = not persisted or container_id in (data.get("sandbox_container"), self.sandbox.id)
        if whole:
            await sandbox_mod.recover(self.sandbox.state_dir, timeout=4.0)
            return
        share_dir = self.sandbox.state_dir / SHARE_DIR
        if share_dir.is_dir():
            await asyncio.to_thread(Virtio9pShare(share_dir).unshare_container, container_id,
                                    lambda name: oci_guest.owns_share_name(container_id, name))
