"""open_fd_stream over character devices and pipes, and ttrpc served through it."""
from __future__ import annotations

import asyncio
import os
import pty
import tty

from ttrpc_testlib import SVC, TASK, TaskImpl, assert_no_other_tasks

from proto.containerd.task.v2 import shim_pb2
from ttrpc import Client, Server
from ttrpc.stream import open_fd_stream


def _raw_pty() -> tuple[int, int]:
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    return master, slave


async def test_open_fd_stream_both_directions_on_a_pty() -> None:
    master, slave = _raw_pty()
    reader, writer = await open_fd_stream(master)
    os.write(slave, b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    writer.write(b"pong")
    await writer.drain()
    assert os.read(slave, 4) == b"pong"
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), 5)
    os.write(slave, b"x")  # the caller's fd is still open and usable
    assert os.read(master, 1) == b"x"
    os.close(master)
    os.close(slave)


async def test_ttrpc_over_a_pty_like_virtio_serial() -> None:
    """The guest agent serves over one char device fd; a pty pair stands in for the port."""
    master, slave = _raw_pty()
    server = Server()
    impl = TaskImpl()
    server.register_service(TASK, impl)
    sr, sw = await open_fd_stream(master)
    serving = asyncio.create_task(server.serve_connection(sr, sw))
    cr, cw = await open_fd_stream(slave)
    c = Client(cr, cw)
    wait = asyncio.create_task(c.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse))
    got = await asyncio.gather(*(c.call(SVC, "State", shim_pb2.StateRequest(id=str(i)), shim_pb2.StateResponse,
                                        timeout=5) for i in range(50)))
    assert [r.id for r in got] == [str(i) for i in range(50)]
    impl.release.set()
    assert (await asyncio.wait_for(wait, 5)).exit_status == 7
    await c.close()
    os.close(slave)  # the "host" goes away: the server side sees EIO/EOF and returns
    await asyncio.wait_for(serving, 5)
    assert server.connection_count == 0
    await server.close()
    os.close(master)
    await assert_no_other_tasks()


async def test_pipe_eof_ends_serve_connection() -> None:
    server = Server()
    server.register_service(TASK, TaskImpl())
    rfd, wfd = os.pipe()
    sr, sw = await open_fd_stream(rfd)  # write side unused: a pipe read end
    serving = asyncio.create_task(server.serve_connection(sr, sw))
    await asyncio.sleep(0.05)
    assert not serving.done()
    os.close(wfd)  # every writer gone: EOF
    await asyncio.wait_for(serving, 5)
    os.close(rfd)
    await assert_no_other_tasks()
