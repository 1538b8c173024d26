"""Child reaping and process spawning.

The agent is a child subreaper (container inits re-parent to it when runc exits) and is the only
caller of waitpid in its process: SIGCHLD → ``waitpid(-1, WNOHANG)`` until none is left, exit
codes go to per-pid futures. Exits of pids nobody watches yet are remembered (bounded), so a
container init that dies before its pid file is read is still reported. Because of that, the
agent never uses asyncio/subprocess waiting: it spawns with :func:`spawn` and waits here.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import signal
from dataclasses import dataclass

from common.errors import DeadlineExceeded, Internal

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
MAX_UNCLAIMED = 4096


def set_child_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def exit_code(status: int) -> int:
    """waitpid status → shell-style exit code (128+signal when killed), as kata reports it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255


class Reaper:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()

    def install(self, *, subreaper: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        if subreaper:
            set_child_subreaper()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_code(status)
            fut = self._waiters.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(code)
            else:
                self._unclaimed[pid] = code
                while len(self._unclaimed) > MAX_UNCLAIMED:
                    self._unclaimed.popitem(last=False)
            log.debug("reaped pid %d: %d", pid, code)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """Future resolved with the exit code of ``pid`` (one of our children or orphans)."""
        loop = self._loop or asyncio.get_running_loop()
        if pid in self._unclaimed:
            fut: asyncio.Future[int] = loop.create_future()
            fut.set_result(self._unclaimed.pop(pid))
            return fut
        fut = self._waiters.get(pid) or loop.create_future()
        self._waiters[pid] = fut
        self.reap()  # a SIGCHLD may have been coalesced before we watched
        return fut


@dataclass
class RunResult:
    code: int
    stdout: bytes
    stderr: bytes


def spawn(argv: list[str], *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None, env: dict[str, str] | None = None) -> int:
    """posix_spawnp ``argv`` with the given fds as 0/1/2 (None → /dev/null); returns the pid."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = []
        for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
            actions.append((os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, target))
        return os.posix_spawnp(argv[0], argv, dict(os.environ if env is None else env),
                               file_actions=actions, setsigdef=(signal.SIGCHLD, signal.SIGPIPE))
    finally:
        os.close(devnull)


async def run(reaper: Reaper, argv: list[str], *, input: bytes | None = None,
              timeout: float | None = 60.0, max_output: int = 4 << 20,
              env: dict[str, str] | None = None) -> RunResult:
    """Run a command to completion, capturing stdout/stderr (each bounded by max_output)."""
    from agent_api.agent.fdio import FdReader, FdWriter

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if input is not None else (None, None)
    try:
        pid = spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=env)
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd is not None:
                os.close(fd)
        raise Internal(f"cannot run {argv[0]}: {exc}") from None
    exited = reaper.watch(pid)
    for fd in (out_w, err_w, in_r):
        if fd is not None:
            os.close(fd)
    readers = [FdReader(out_r), FdReader(err_r)]

    async def feed() -> None:
        if in_w is None:
            return
        writer = FdWriter(in_w)
        try:
            await writer.write_all(input or b"")
        except BrokenPipeError:
            pass
        finally:
            writer.close()

    try:
        async with asyncio.timeout(timeout):
            _, out, err = await asyncio.gather(
                feed(), readers[0].read_all(max_output), readers[1].read_all(max_output))
            code = await exited
    except TimeoutError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise DeadlineExceeded(f"{argv[0]} timed out after {timeout}s") from None
    finally:
        for r in readers:
            r.close()
    return RunResult(code, out, err)
