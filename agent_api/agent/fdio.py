"""Non-blocking fd readers/writers on the event loop (pipes, pty masters) and the runc
console socket that hands over a pty master via SCM_RIGHTS."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import termios

from common.errors import DeadlineExceeded, FailedPrecondition, Internal


class _FdBase:
    _writable = False

    def __init__(self, fd: int, *, owns: bool = True) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._owns = owns
        self._lock = asyncio.Lock()
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def closed(self) -> bool:
        return self.fd < 0

    async def _wait(self) -> None:
        writable = self._writable
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = self.fd
        (loop.add_writer if writable else loop.add_reader)(fd, ready)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if self.fd == fd:
                (loop.remove_writer if writable else loop.remove_reader)(fd)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            loop = asyncio.get_running_loop()
            (loop.remove_writer if self._writable else loop.remove_reader)(fd)
        except RuntimeError:
            pass
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)
        if self._owns:
            os.close(fd)


class FdReader(_FdBase):
    """``read(n)`` blocks until data; returns b"" at EOF (also EIO of a hung-up pty master)."""

    async def read(self, n: int) -> bytes:
        async with self._lock:
            while True:
                if self.fd < 0:
                    return b""
                try:
                    return os.read(self.fd, n)
                except BlockingIOError:
                    await self._wait()
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        return b""
                    raise

    async def read_all(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            data = await self.read(65536)
            if not data:
                return b"".join(chunks)
            if size < limit:
                chunks.append(data[: limit - size])
            size += len(data)


class FdWriter(_FdBase):
    _writable = True
    async def write(self, data: bytes) -> int:
        """Write some of ``data`` (waits until the fd is writable); returns bytes written."""
        async with self._lock:
            while True:
                if self.fd < 0:
                    raise FailedPrecondition("stdin is closed")
                try:
                    return os.write(self.fd, data)
                except BlockingIOError:
                    await self._wait()

    async def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.write(bytes(view[:65536]))
            view = view[n:]


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ConsoleSocket:
    """A listening Unix socket passed to runc as ``--console-socket``; yields the pty master."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.lexists(path):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(1)
        self._sock.setblocking(False)

    async def receive(self, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(self._sock)
                with conn:
                    conn.setblocking(False)
                    while True:
                        try:
                            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                            break
                        except BlockingIOError:
                            fut: asyncio.Future[None] = loop.create_future()
                            loop.add_reader(conn.fileno(), fut.set_result, None)
                            try:
                                await fut
                            finally:
                                loop.remove_reader(conn.fileno())
        except TimeoutError:
            raise DeadlineExceeded("runc did not send a console") from None
        if not fds:
            raise Internal("runc closed the console socket without sending a pty")
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

