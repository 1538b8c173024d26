"""asyncio streams over a file descriptor that is not a socket: a character device such as a
virtio-serial port (/dev/vportNpM) or a pipe.

EOF: when the host side of a virtio-serial port is not connected (or disconnects), reads in the
guest return 0 bytes, which the StreamReader reports as EOF; the caller closes the stream and
opens the port again to wait for the next host connection.
"""
from __future__ import annotations

import asyncio
import os


class _FdStreamWriter(asyncio.StreamWriter):
    """A writer whose close() also closes the separate read-side transport."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: asyncio.BaseProtocol,
                 reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop,
                 read_transport: asyncio.ReadTransport) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._read_transport = read_transport

    def close(self) -> None:
        super().close()
        self._read_transport.close()


async def open_fd_stream(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Wrap ``fd`` (not consumed: dup'ed for each direction) in a (reader, writer) pair."""
    loop = asyncio.get_running_loop()
    rfd, wfd = os.dup(fd), os.dup(fd)
    try:
        reader = asyncio.StreamReader(limit=2**20)
        rproto = asyncio.StreamReaderProtocol(reader)
        rtransport, _ = await loop.connect_read_pipe(lambda: rproto, os.fdopen(rfd, "rb", buffering=0))
        rfd = -1
        wtransport, wproto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                           os.fdopen(wfd, "wb", buffering=0))
        wfd = -1
    finally:
        for leftover in (rfd, wfd):
            if leftover >= 0:
                os.close(leftover)
    writer = _FdStreamWriter(wtransport, wproto, reader, loop, rtransport)
    return reader, writer
