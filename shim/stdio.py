"""containerd stdio endpoints for a process running in the guest.

containerd hands the shim three URIs per process (docs/protocols.md §5): an empty string (null IO),
a FIFO path (no scheme), ``file:///path`` (append) or ``binary:///path?k=v`` (a logger process
receiving stdout on fd 3, stderr on fd 4 and signalling readiness by closing fd 5).
The guest side is abstracted as two coroutines: ``read_chunk()`` (b"" at EOF) and
``write_chunk(data)``; :class:`ProcessIO` copies between them and the endpoints.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.errors import InvalidArgument
from shim.backend import Stdio

log = logging.getLogger(__name__)

ReadChunk = Callable[[], Awaitable[bytes]]
WriteChunk = Callable[[bytes], Awaitable[None]]
CHUNK = 32 * 1024


def validate(spec: Stdio) -> Stdio:
    """containerd's stdio URIs for one process, checked: FIFO paths, ``file://`` or ``binary://``
    for output, a FIFO for stdin; no NUL bytes (InvalidArgument otherwise)."""
    for name in ("stdin", "stdout", "stderr"):
        uri = getattr(spec, name)
        if "\x00" in uri:
            raise InvalidArgument(f"{name}: NUL byte in stdio path")
        scheme = urllib.parse.urlparse(uri).scheme if "://" in uri else ""
        if scheme not in ("", "fifo", "file", "binary"):
            raise InvalidArgument(f"{name}: unsupported stdio scheme {scheme!r}")
        if name == "stdin" and scheme in ("file", "binary"):
            raise InvalidArgument("stdin: only a FIFO path is supported")
    return spec


class _Sink:
    """Where guest output goes: an async write + an idempotent close."""

    def __init__(self, write: Callable[[bytes], Awaitable[None]], close: Callable[[], None]) -> None:
        self.write = write
        self._close = close
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()


def _open_fifo_writer(path: str) -> tuple[int, int]:
    """(write fd, holder fd) of containerd's FIFO, without blocking.

    The O_RDWR holder never blocks even if containerd's reader is not there yet, and keeps the
    FIFO open; writes go through a separate O_WRONLY fd. Never write through the O_RDWR fd with
    asyncio's write-pipe transport: it watches its fd for readability to detect a closed peer,
    and an O_RDWR FIFO fd turns readable as soon as unread output sits in the FIFO, so the
    transport would close itself and silently drop the rest of the output."""
    holder = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), holder
    except BaseException:
        os.close(holder)
        raise


async def _fd_sink(fd: int, holder: int = -1) -> _Sink:
    """A sink owning ``fd`` (and ``holder``, closed with it), also if this call fails."""
    loop = asyncio.get_running_loop()
    file = os.fdopen(fd, "wb", buffering=0, closefd=True)
    try:
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, file)
    except BaseException:
        file.close()
        if holder >= 0:
            os.close(holder)
        raise
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def write(data: bytes) -> None:
        if writer.is_closing():
            raise BrokenPipeError("output endpoint closed")
        writer.write(data)
        await writer.drain()

    def close() -> None:
        writer.close()
        if holder >= 0:
            os.close(holder)

    return _Sink(write, close)


def _file_sink(path: str) -> _Sink:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    async def write(data: bytes) -> None:
        await asyncio.to_thread(os.write, fd, data)

    def close() -> None:
        with contextlib.suppress(OSError):
            os.close(fd)

    return _Sink(write, close)


@dataclass
class _BinaryLogger:
    proc: subprocess.Popen[bytes]
    stdout_w: int
    stderr_w: int


def _start_binary_logger(uri: str, namespace: str, cid: str) -> _BinaryLogger:
    parsed = urllib.parse.urlparse(uri)
    args = []
    for key, values in urllib.parse.parse_qs(parsed.query).items():
        for v in values:
            args += [key, v] if v else [key]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    env = dict(os.environ, CONTAINER_ID=cid, CONTAINER_NAMESPACE=namespace)

    def child_fds() -> None:
        for src, dst in ((out_r, 3), (err_r, 4), (ready_w, 5)):
            os.dup2(src, dst)
            os.set_inheritable(dst, True)

    try:
        proc = subprocess.Popen([parsed.path, *args], env=env, stdin=subprocess.DEVNULL,
                                preexec_fn=child_fds, pass_fds=(3, 4, 5), close_fds=True)
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
            os.close(fd)
        raise InvalidArgument(f"cannot start stdio logger {parsed.path}: {exc}") from None
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    try:  # the logger closes fd 5 (or exits) when it is ready
        os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    return _BinaryLogger(proc, out_w, err_w)


@dataclass
class ProcessIO:
    """Copies one guest process's stdio to/from containerd's endpoints."""

    spec: Stdio
    namespace: str = "default"
    container_id: str = ""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _out_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sinks: list[_Sink] = field(default_factory=list)
    _logger: _BinaryLogger | None = None
    _stdin_fd: int | None = None
    _stdin_task: asyncio.Task[None] | None = None
    _close_stdin: Callable[[], Awaitable[None]] | None = None
    _closed: bool = False

    async def _sink_for(self, uri: str, which: str) -> _Sink | None:
        if not uri:
            return None
        parsed = urllib.parse.urlparse(uri) if "://" in uri else None
        if parsed is None or parsed.scheme == "fifo":
            path = parsed.path if parsed else uri
            return await _fd_sink(*_open_fifo_writer(path))
        if parsed.scheme == "file":
            return _file_sink(parsed.path)
        # binary://: one logger process for both streams
        if self._logger is None:
            self._logger = await asyncio.to_thread(_start_binary_logger, uri, self.namespace, self.container_id)
        lg = self._logger
        fd = lg.stdout_w if which == "stdout" else lg.stderr_w
        if which == "stdout":
            lg.stdout_w = -1
        else:
            lg.stderr_w = -1
        return await _fd_sink(fd)  # the sink owns the fd from here on

    async def start(self, read_stdout: ReadChunk | None, read_stderr: ReadChunk | None,
                    write_stdin: WriteChunk | None, close_stdin: Callable[[], Awaitable[None]] | None) -> None:
        """Open the endpoints and start copying. Output copies end at guest EOF."""
        validate(self.spec)
        out = await self._sink_for(self.spec.stdout, "stdout")
        err = None if self.spec.terminal else await self._sink_for(self.spec.stderr, "stderr")
        for sink, reader in ((out, read_stdout), (err, read_stderr)):
            if sink is None:
                continue
            self._sinks.append(sink)
            if reader is not None:
                self._out_tasks.append(asyncio.create_task(self._copy_out(reader, sink)))
        if self.spec.stdin and write_stdin is not None:
            self._stdin_fd = os.open(self.spec.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._close_stdin = close_stdin
            self._stdin_task = asyncio.create_task(self._copy_in(self._stdin_fd, write_stdin, close_stdin))
            self._tasks.append(self._stdin_task)

    async def _copy_out(self, reader: ReadChunk, sink: _Sink) -> None:
        try:
            while True:
                data = await reader()
                if not data:
                    break
                await sink.write(data)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # the guest went away or the reader closed its FIFO
            log.debug("stdout/stderr copy ended: %s", exc)
        # Like runc's shim: the output ends here, so close our end now; containerd's CRI
        # ExecSync waits for EOF on the stdout/stderr FIFOs before it deletes the exec.
        with contextlib.suppress(Exception):
            sink.close()

    async def _copy_in(self, fd: int, write: WriteChunk, close: Callable[[], Awaitable[None]] | None) -> None:
        loop = asyncio.get_running_loop()
        # Opened O_NONBLOCK: until containerd's writer connects, Linux reports no readiness
        # (not a hang-up), so the first readable event is data or the writer's EOF.
        try:
            while True:
                ready = loop.create_future()
                loop.add_reader(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    break
                await write(data)
            if close is not None:
                await close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("stdin copy ended: %s", exc)

    async def close_stdin(self, timeout: float = 2.0) -> None:
        """containerd's CloseIO: its writer is closed, so let the copy drain what is still in the
        FIFO (it ends at EOF and closes the guest's stdin); force it after ``timeout``."""
        task = self._stdin_task
        if task is None:
            if self._close_stdin is not None:
                await self._close_stdin()
            return
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if self._close_stdin is not None:
                await self._close_stdin()

    async def wait_output(self, timeout: float | None = None) -> None:
        """Wait until stdout/stderr copies reached EOF (so output is flushed before exit events)."""
        if self._out_tasks:
            await asyncio.wait(self._out_tasks, timeout=timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = self._out_tasks + self._tasks
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.close()
        if self._stdin_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._stdin_fd)
        if self._logger is not None:
            lg = self._logger
            for fd in (lg.stdout_w, lg.stderr_w):  # ends the sinks never took over
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lg.proc.wait, 5)
