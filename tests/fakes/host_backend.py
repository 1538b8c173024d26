"""TEST-ONLY backend: runs each container's process as a plain host subprocess (no VM, no
isolation, the rootfs is ignored). It exists so the shim's containerd contract can be tested
against a real containerd without booting VMs. It is reachable only through the wrapper script
tests/fakes/bin/containerd-shim-kata-colo-v2; nothing in the product can select it."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from shim.backend import BackendContext, CreateOpts, ExecOpts, ExitInfo, ProcessPid, Stats
from shim.errors import FailedPrecondition, NotFound, Unimplemented
from shim.process import now
from shim.stdio import ProcessIO, StdioSpec


@dataclass
class _Proc:
    args: list[str]
    env: dict[str, str]
    stdio: StdioSpec
    proc: asyncio.subprocess.Process | None = None
    io: ProcessIO | None = None
    killed_before_start: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class HostBackend:
    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.procs: dict[tuple[str, str], _Proc] = {}

    def _get(self, cid: str, eid: str) -> _Proc:
        try:
            return self.procs[(cid, eid)]
        except KeyError:
            raise NotFound(f"process {cid}/{eid} not found") from None

    @staticmethod
    def _from_process(process: dict[str, Any], stdio: Any) -> _Proc:
        env = dict(e.split("=", 1) for e in process.get("env", []) if "=" in e)
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        spec = StdioSpec(stdio.stdin, stdio.stdout, stdio.stderr, stdio.terminal)
        return _Proc(list(process["args"]), env, spec)

    async def create(self, opts: CreateOpts) -> int:
        if opts.stdio.terminal:
            raise Unimplemented("the host test backend has no terminals")
        self.procs[(opts.id, "")] = self._from_process(opts.spec["process"], opts.stdio)
        return os.getpid()

    async def exec(self, opts: ExecOpts) -> None:
        if (opts.id, "") not in self.procs:
            raise NotFound(f"container {opts.id} not found")
        self.procs[(opts.id, opts.exec_id)] = self._from_process(opts.spec, opts.stdio)

    async def start(self, container_id: str, exec_id: str) -> int:
        p = self._get(container_id, exec_id)
        if p.proc is not None:
            raise FailedPrecondition("already started")
        p.proc = await asyncio.create_subprocess_exec(
            *p.args, env=p.env, cwd="/", stdin=asyncio.subprocess.PIPE if p.stdio.stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        proc = p.proc

        async def write_stdin(data: bytes) -> None:
            assert proc.stdin is not None
            proc.stdin.write(data)
            await proc.stdin.drain()

        async def close_stdin() -> None:
            if proc.stdin is not None:
                proc.stdin.close()

        p.io = ProcessIO(p.stdio, self.ctx.namespace, container_id)
        await p.io.start(lambda: proc.stdout.read(32768), lambda: proc.stderr.read(32768),  # type: ignore[union-attr]
                         write_stdin, close_stdin)
        return proc.pid

    async def wait(self, container_id: str, exec_id: str) -> ExitInfo:
        p = self._get(container_id, exec_id)
        while p.proc is None:
            if p.killed_before_start:
                return ExitInfo(128 + signal.SIGKILL, now())
            await asyncio.sleep(0.05)
        rc = await p.proc.wait()
        if p.io is not None:
            await p.io.wait_output(timeout=2)
        return ExitInfo(rc if rc >= 0 else 128 - rc, now())

    async def kill(self, container_id: str, exec_id: str, signal_: int, all: bool) -> None:
        targets = [p for (c, e), p in self.procs.items() if c == container_id and (all or e == exec_id)]
        if not targets:
            raise NotFound(f"process {container_id}/{exec_id} not found")
        for p in targets:
            if p.proc is None:
                p.killed_before_start = True
            elif p.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal_)

    async def delete(self, container_id: str, exec_id: str) -> None:
        keys = [k for k in self.procs if k[0] == container_id and (exec_id == "" or k[1] == exec_id)]
        for k in keys:
            p = self.procs.pop(k)
            if p.proc is not None and p.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                await p.proc.wait()
            if p.io is not None:
                await p.io.close()

    async def pids(self, container_id: str) -> list[ProcessPid]:
        return [ProcessPid(p.proc.pid, e) for (c, e), p in self.procs.items()
                if c == container_id and p.proc is not None and p.proc.returncode is None]

    async def pause(self, container_id: str) -> None:
        await self.kill(container_id, "", signal.SIGSTOP, True)

    async def resume(self, container_id: str) -> None:
        await self.kill(container_id, "", signal.SIGCONT, True)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        raise Unimplemented("the host test backend has no terminals")

    async def close_io(self, container_id: str, exec_id: str) -> None:
        p = self._get(container_id, exec_id)
        if p.io is not None:
            await p.io.close_stdin()

    async def update(self, container_id: str, resources: dict[str, Any], annotations: dict[str, str]) -> None:
        self._get(container_id, "")

    async def stats(self, container_id: str) -> Stats:
        p = self._get(container_id, "")
        if p.proc is None or p.proc.returncode is not None:
            return Stats()
        fields = open(f"/proc/{p.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        user, kernel = int(fields[11]) * 10**9 // tick, int(fields[12]) * 10**9 // tick
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        return Stats(cpu_usage_ns=user + kernel, cpu_user_ns=user, cpu_kernel_ns=kernel,
                     memory_usage=rss, memory_rss=rss, pids_current=1)

    async def shutdown(self) -> None:
        for cid, eid in list(self.procs):
            await self.delete(cid, eid)

    def persist_data(self) -> dict[str, Any]:
        return {"pids": {f"{c}/{e}": p.proc.pid for (c, e), p in self.procs.items() if p.proc is not None}}

    async def cleanup_after_crash(self, container_id: str, bundle: str, persisted: dict[str, Any] | None) -> None:
        for key, pid in ((persisted or {}).get("pids") or {}).items():
            if key.split("/", 1)[0] == container_id:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
