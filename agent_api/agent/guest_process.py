"""A container process as the agent sees it: pid, exit future and stdio endpoints.

stdio is either three pipes (the agent keeps stdin's write end and the read ends of
stdout/stderr; runc passes the other ends through to the process) or a pty whose master runc
sends over a console socket (stdout carries both streams, stderr is empty).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass

from agent_api.agent.fdio import ConsoleSocket, FdReader, FdWriter, set_winsize
from agent_api.agent.runc import Stdio
from common.errors import FailedPrecondition, Internal

CONSOLE_TIMEOUT = 60.0
CONSOLE_FAIL_GRACE = 10.0  # wait for runc's error after it closed the console socket


class StreamEOF(Internal):
    """ReadStdout/ReadStderr at end of stream. kata's agent answers EOF with an error
    (INTERNAL, "eof") that kata's shim treats as the end of the copy; so do we."""

    def __init__(self, message: str = "eof") -> None:
        super().__init__(message)


@dataclass
class Process:
    container_id: str
    exec_id: str
    pid: int
    exited: asyncio.Future[int]
    terminal: bool = False
    stdin: FdWriter | None = None
    stdout: FdReader | None = None
    stderr: FdReader | None = None
    pty_master: int = -1

    @property
    def init(self) -> bool:
        return self.exec_id == ""

    @property
    def running(self) -> bool:
        return not self.exited.done()

    async def read(self, stderr: bool, length: int) -> bytes:
        reader = self.stderr if stderr else self.stdout
        if reader is None:
            raise StreamEOF()
        data = await reader.read(length)
        if not data:
            raise StreamEOF()
        return data

    async def write_stdin(self, data: bytes) -> int:
        if self.stdin is None or self.stdin.closed:
            raise FailedPrecondition(f"stdin of {self.container_id}/{self.exec_id} is closed")
        if not data:
            return 0
        try:
            await self.stdin.write_all(data)
        except BrokenPipeError:
            raise FailedPrecondition("process closed its stdin") from None
        return len(data)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            self.stdin.close()

    def resize(self, rows: int, cols: int) -> None:
        if self.pty_master < 0:
            raise FailedPrecondition(f"{self.container_id}/{self.exec_id} has no terminal")
        set_winsize(self.pty_master, rows, cols)

    def close_io(self) -> None:
        for end in (self.stdin, self.stdout, self.stderr):
            if end is not None:
                end.close()
        self.pty_master = -1


class StdioSetup:
    """Creates the process's stdio before runc runs and turns it into Process fields after."""

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self._child: list[int] = []
        self._ours: dict[str, int] = {}
        self._console: ConsoleSocket | None = None
        self._sockdir: str | None = None
        self.master: int = -1
        if terminal:
            # sun_path is limited to 108 bytes: keep the socket in a short private dir
            self._sockdir = tempfile.mkdtemp(prefix="kca-")
            self._console = ConsoleSocket(os.path.join(self._sockdir, "console.sock"))
        else:
            for name in ("stdin", "stdout", "stderr"):
                r, w = os.pipe()
                ours, child = (w, r) if name == "stdin" else (r, w)
                self._ours[name] = ours
                self._child.append(child)

    @property
    def console_path(self) -> str | None:
        return self._console.path if self._console else None

    @property
    def runc_stdio(self) -> Stdio:
        if self.terminal:
            return Stdio(None, None, None)
        return Stdio(*self._child)

    async def run(self, runc_call: Awaitable[None]) -> None:
        """Await the runc call; with a terminal also receive the pty master meanwhile."""
        try:
            if self._console is None:
                await runc_call
                return
            call = asyncio.ensure_future(runc_call)
            recv = asyncio.ensure_future(self._console.receive(CONSOLE_TIMEOUT))
            try:
                done, _ = await asyncio.wait({call, recv}, return_when=asyncio.FIRST_COMPLETED)
                if call in done and call.exception() is not None:
                    raise call.exception()  # type: ignore[misc]
                if recv in done and recv.exception() is not None:
                    # runc hung up without a pty: its own error says why (e.g. no /dev/ptmx)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(call), CONSOLE_FAIL_GRACE)
                    if call.done() and call.exception() is not None:
                        raise call.exception()  # type: ignore[misc]
                self.master = await recv
                await call
            finally:
                for t in (call, recv):
                    if not t.done():
                        t.cancel()
                        await asyncio.gather(t, return_exceptions=True)
        finally:
            self._close_child_ends()

    def _close_child_ends(self) -> None:
        for fd in self._child:
            os.close(fd)
        self._child = []
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def attach(self, proc: Process) -> None:
        """Hand the agent's ends over to ``proc`` (ownership moves with them)."""
        if self.terminal:
            reader = FdReader(self.master)
            proc.stdout = reader
            proc.stdin = FdWriter(self.master, owns=False)
            proc.pty_master = self.master
            proc.terminal = True
        else:
            proc.stdin = FdWriter(self._ours.pop("stdin"))
            proc.stdout = FdReader(self._ours.pop("stdout"))
            proc.stderr = FdReader(self._ours.pop("stderr"))
        self.master = -1

    def close(self) -> None:
        """Release everything not attached (after a failure)."""
        self._close_child_ends()
        for fd in self._ours.values():
            os.close(fd)
        self._ours = {}
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
