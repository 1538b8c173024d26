"""asyncio streams over a file descriptor that is not a socket: a character device such as a
virtio-serial port (``/dev/vport0p1`` opened O_RDWR in the guest), a pty, or a pipe.

The fd is dup'ed twice, one copy per direction (``loop.connect_read_pipe`` /
``loop.connect_write_pipe``); the caller keeps and eventually closes ``fd`` itself. Note that
O_NONBLOCK is a property of the open file description, so ``fd`` becomes non-blocking too.

EOF behaviour:

* virtio-serial: while the host side of the port is not connected (or after it disconnects),
  ``read()`` in the guest returns 0 and ``poll()`` reports POLLHUP. The StreamReader then sees
  EOF (``readexactly`` raises IncompleteReadError, ``ttrpc.framing.read_frame`` returns None)
  and the read transport closes itself, so :meth:`ttrpc.Server.serve_connection` returns. The
  stream cannot be resumed: close the writer, wait a little (the fd keeps polling as HUP until
  the host reconnects, so do not spin), and call :func:`open_fd_stream` again. Writes while the
  host is away fail with EAGAIN and stay buffered in the write transport.
* pty master: when the slave side is closed Linux returns EIO instead of 0; asyncio reports it
  as a connection loss (the reader raises OSError), which ttrpc treats like EOF.
* pipe: EOF when every write end is closed.

Closing the returned writer closes both transports (both dup'ed fds); ``wait_closed()`` works.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any


class _WriteProtocol(asyncio.streams.FlowControlMixin):
    """Flow control for the write half, with the close waiter StreamWriter.wait_closed() needs
    (the plain FlowControlMixin raises NotImplementedError there)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: Any) -> asyncio.Future[None]:
        return self._closed


class _FdStreamWriter(asyncio.StreamWriter):
    """A writer whose close() also closes the separate read-side transport."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: _WriteProtocol,
                 reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop,
                 read_transport: asyncio.ReadTransport) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._read_transport = read_transport

    def close(self) -> None:
        super().close()
        self._read_transport.close()


async def open_fd_stream(fd: int, *, limit: int = 2**20) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Wrap ``fd`` (not consumed: dup'ed for each direction) in a (reader, writer) pair."""
    loop = asyncio.get_running_loop()
    rfile = os.fdopen(os.dup(fd), "rb", buffering=0)
    try:
        wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
    except BaseException:
        rfile.close()
        raise
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    rproto = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        rtransport, _ = await loop.connect_read_pipe(lambda: rproto, rfile)
    except BaseException:
        rfile.close()
        wfile.close()
        raise
    try:
        wtransport, wproto = await loop.connect_write_pipe(lambda: _WriteProtocol(loop), wfile)
    except BaseException:
        rtransport.close()
        wfile.close()
        raise
    return reader, _FdStreamWriter(wtransport, wproto, reader, loop, rtransport)
