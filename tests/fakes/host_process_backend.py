"""TEST-ONLY :class:`shim.backend.Backend` running container processes as plain host processes
(no VM, no namespaces, no cgroups), faithful to the parts containerd observes:

* Create forks the init process and parks it on a start gate, so Create reports a real pid that
  Start keeps (like runc's ``create``/``start``); Delete before Start kills it (exit 137).
* process.args/env/cwd from the bundle's config.json, chroot'ed into ``<bundle>/<root.path>``
  when that directory is populated (containerd's snapshot, mounted by the task service), so
  ``ctr run IMG ID echo hello`` runs the image's busybox.
* stdio: the child gets containerd's FIFOs (write ends opened O_RDWR so open never blocks),
  ``file://`` appends, empty = /dev/null; ctr sees real output and real exit codes.
* exits via pidfd; ``persist_data``/``cleanup_after_crash`` kill exactly the recorded
  (pid, start-time) pairs, so a reused pid is never signalled.

Reachable only through tests (``shim.cli.main(backend_factory=HostProcessBackend)``).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import FailedPrecondition, NotFound, Unimplemented
from common.mount import is_mountpoint
from shim import rootfs as rootfs_mod
from shim.backend import BackendContext, CreateOpts, ExecOpts, ExitInfo, ProcessPid, Stats, Stdio

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                  signal.SIGCHLD, signal.SIGQUIT)


def _open_stdio(stdio: Stdio) -> list[int]:
    """[stdin, stdout, stderr] fds for the child (closed in the parent after fork)."""
    if stdio.terminal:
        raise Unimplemented("the host test backend has no terminal support")
    fds: list[int] = []
    try:
        for name in ("stdin", "stdout", "stderr"):
            uri = getattr(stdio, name)
            if not uri:
                fds.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
            elif uri.startswith("binary://"):
                raise Unimplemented("the host test backend has no binary:// logger support")
            elif uri.startswith("file://"):
                fds.append(os.open(uri[len("file://"):], os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o640))
            elif name == "stdin":
                fd = os.open(uri.removeprefix("fifo://"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                fds.append(fd)
            else:
                fds.append(os.open(uri.removeprefix("fifo://"), os.O_RDWR | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw.rsplit(")", 1)[1].split()[19])


@dataclass
class _Proc:
    args: list[str]
    env: list[str]
    cwd: str
    root: str | None
    stdio: Stdio
    pid: int = 0
    gate_w: int = -1
    exit: asyncio.Future[ExitInfo] | None = None

    @property
    def alive(self) -> bool:
        return self.pid > 0 and self.exit is not None and not self.exit.done()


@dataclass
class _Container:
    id: str
    bundle: str
    root: str | None
    mounted_here: bool
    procs: dict[str, _Proc] = field(default_factory=dict)


class HostProcessBackend:
    """One instance per shim daemon."""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.containers: dict[str, _Container] = {}
        self.updates: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    # --- process plumbing -------------------------------------------------------------------

    def _spawn(self, proc: _Proc, gated: bool) -> None:
        fds = _open_stdio(proc.stdio)
        gate_r, gate_w = os.pipe()
        loop = asyncio.get_running_loop()
        pid = os.fork()
        if pid == 0:  # child: os-level calls only, then exec
            code = 127
            try:
                os.close(gate_w)
                for sig in _RESET_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.setpgid(0, 0)
                if not os.read(gate_r, 1):
                    code = 128 + signal.SIGKILL  # deleted before start
                    raise SystemExit
                if proc.root:
                    os.chroot(proc.root)
                os.chdir(proc.cwd or "/")
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                env = dict(e.split("=", 1) for e in proc.env if "=" in e)
                env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
                os.execvpe(proc.args[0], proc.args, env)
            except BaseException:  # noqa: BLE001 - reported through the exit code
                pass
            os._exit(code)
        os.close(gate_r)
        for fd in fds:
            os.close(fd)
        proc.pid, proc.gate_w, proc.exit = pid, gate_w, loop.create_future()
        pidfd = os.pidfd_open(pid)

        def reap() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            assert proc.exit is not None
            if not proc.exit.done():
                proc.exit.set_result(ExitInfo(128 - code if code < 0 else code,
                                              datetime.now(UTC)))

        loop.add_reader(pidfd, reap)
        if not gated:
            self._release(proc)

    @staticmethod
    def _release(proc: _Proc) -> None:
        if proc.gate_w >= 0:
            os.write(proc.gate_w, b"g")
            os.close(proc.gate_w)
            proc.gate_w = -1

    def _container(self, cid: str) -> _Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise NotFound(f"container {cid} not found") from None

    def _proc(self, cid: str, eid: str) -> _Proc:
        try:
            return self._container(cid).procs[eid]
        except KeyError:
            raise NotFound(f"process {eid} not found in {cid}") from None

    # --- Backend ------------------------------------------------------------------------------

    async def create(self, opts: CreateOpts) -> int:
        process = opts.spec.get("process") or {}
        args = process.get("args") or []
        if not args:
            raise FailedPrecondition("config.json has no process.args")
        root_rel = (opts.spec.get("root") or {}).get("path", "")
        root_dir = Path(opts.bundle, root_rel) if root_rel else None
        mounted_here = False
        if opts.rootfs and root_dir is not None and not is_mountpoint(root_dir):
            mounted_here = rootfs_mod.mount_rootfs(
                list(opts.rootfs),
                root_dir)
        populated = root_dir is not None and root_dir.is_dir() and any(root_dir.iterdir())
        root = str(root_dir) if populated else None
        proc = _Proc(list(args), list(process.get("env") or []), process.get("cwd") or "/",
                     root, opts.stdio)
        try:
            self._spawn(proc, gated=True)
        except BaseException:
            if mounted_here and root_dir is not None:
                rootfs_mod.unmount_all(root_dir)
            raise
        self.containers[opts.id] = _Container(opts.id, opts.bundle, root, mounted_here, {"": proc})
        return proc.pid

    async def start(self, container_id: str, exec_id: str) -> int:
        proc = self._proc(container_id, exec_id)
        if proc.pid == 0:
            self._spawn(proc, gated=False)
        elif proc.gate_w >= 0:
            self._release(proc)
        else:
            raise FailedPrecondition(f"process {exec_id or container_id} already started")
        return proc.pid

    async def exec(self, opts: ExecOpts) -> None:
        c = self._container(opts.id)
        spec = opts.spec
        c.procs[opts.exec_id] = _Proc(list(spec["args"]), list(spec.get("env") or []),
                                      spec.get("cwd") or "/", c.root, opts.stdio)

    async def wait(self, container_id: str, exec_id: str) -> ExitInfo:
        proc = self._proc(container_id, exec_id)
        if proc.exit is None:
            raise FailedPrecondition(f"process {exec_id or container_id} not started")
        return await asyncio.shield(proc.exit)

    async def kill(self, container_id: str, exec_id: str, signal_: int, all: bool) -> None:
        c = self._container(container_id)
        targets = list(c.procs.values()) if all else [self._proc(container_id, exec_id)]
        sent = False
        for p in targets:
            if p.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal_)
                    sent = True
        if not sent:
            raise NotFound(f"process {exec_id or container_id} not running")

    async def delete(self, container_id: str, exec_id: str) -> None:
        c = self.containers.get(container_id)
        if c is None:
            return
        procs = [c.procs.get(exec_id)] if exec_id else list(c.procs.values())
        for p in procs:
            if p is None or not p.alive:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            if p.gate_w >= 0:
                os.close(p.gate_w)
                p.gate_w = -1
            assert p.exit is not None
            await asyncio.shield(p.exit)
        if exec_id:
            c.procs.pop(exec_id, None)
            return
        if c.mounted_here and c.root:
            rootfs_mod.unmount_all(Path(c.root))
        del self.containers[container_id]

    async def pids(self, container_id: str) -> list[ProcessPid]:
        return [ProcessPid(p.pid, eid) for eid, p in self._container(container_id).procs.items()
                if p.alive]

    async def _signal_all(self, container_id: str, sig: int) -> None:
        for p in self._container(container_id).procs.values():
            if p.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    async def pause(self, container_id: str) -> None:
        await self._signal_all(container_id, signal.SIGSTOP)

    async def resume(self, container_id: str) -> None:
        await self._signal_all(container_id, signal.SIGCONT)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        raise Unimplemented("the host test backend has no terminal support")

    async def close_io(self, container_id: str, exec_id: str) -> None:
        self._proc(container_id, exec_id)  # the child owns its stdin; nothing is held here

    async def update(self, container_id: str, resources: dict[str, Any],
                     annotations: dict[str, str]) -> None:
        self._container(container_id)
        self.updates.append((container_id, resources, annotations))

    async def stats(self, container_id: str) -> Stats:
        cpu = rss = 0
        pids = await self.pids(container_id)
        for p in pids:
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLK_TCK
                rss += int(fields[21]) * _PAGE
            except (OSError, IndexError, ValueError):
                continue
        return Stats(cpu_usage_ns=cpu, memory_usage=rss, memory_rss=rss, pids_current=len(pids))

    async def shutdown(self) -> None:
        for cid in list(self.containers):
            await self.delete(cid, "")

    def persist_data(self) -> dict[str, Any]:
        return {"containers": {
            cid: {"bundle": c.bundle, "mounted_here": c.mounted_here, "root": c.root,
                  "pids": [[p.pid, _start_time(p.pid)] for p in c.procs.values() if p.pid]}
            for cid, c in self.containers.items()}}

    async def cleanup_after_crash(self, container_id: str, bundle: str,
                                  persisted: dict[str, Any] | None) -> None:
        entry = ((persisted or {}).get("containers") or {}).get(container_id)
        if not entry:
            return
        for pid, started in entry.get("pids") or []:
            if started is not None and _start_time(pid) == started:  # never a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if entry.get("mounted_here") and entry.get("root"):
            rootfs_mod.unmount_all(Path(entry["root"]))

    # --- test hook --------------------------------------------------------------------------

    def simulate_oom(self, container_id: str) -> None:
        """What the VM backend does on the agent's OOM event."""
        self._container(container_id)
        self.ctx.on_oom(container_id)
