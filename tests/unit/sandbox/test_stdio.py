import asyncio
import os
import stat
import sys

import pytest

from common.errors import InvalidArgument
from shim.backend import Stdio
from shim.stdio import ProcessIO, validate


def _chunks(*parts):
    items = list(parts)

    async def read():
        await asyncio.sleep(0)
        return items.pop(0) if items else b""

    return read


async def test_fifo_stdout_and_stdin(tmp_path):
    out_fifo, in_fifo = tmp_path / "out", tmp_path / "in"
    os.mkfifo(out_fifo)
    os.mkfifo(in_fifo)
    reader_fd = os.open(out_fifo, os.O_RDONLY | os.O_NONBLOCK)
    received, closed = [], asyncio.Event()

    async def write_stdin(data):
        received.append(data)

    async def close_stdin():
        closed.set()

    io = ProcessIO(Stdio(stdin=str(in_fifo), stdout=str(out_fifo)))
    await io.start(_chunks(b"hello ", b"world\n"), None, write_stdin, close_stdin)
    await io.wait_output(timeout=5)
    assert os.read(reader_fd, 100) == b"hello world\n"
    writer = os.open(in_fifo, os.O_WRONLY)
    os.write(writer, b"input\n")
    os.close(writer)
    await asyncio.wait_for(closed.wait(), 5)
    assert b"".join(received) == b"input\n"
    await io.close()
    os.close(reader_fd)


async def test_fifo_reader_sees_eof_when_the_guest_output_ends(tmp_path):
    """CRI ExecSync waits for EOF on the exec's FIFOs before it deletes the exec (as runc's
    shim does, we close our end at guest EOF, not only at delete)."""
    out_fifo, err_fifo = tmp_path / "out", tmp_path / "err"
    os.mkfifo(out_fifo)
    os.mkfifo(err_fifo)
    out_r = os.open(out_fifo, os.O_RDONLY | os.O_NONBLOCK)
    err_r = os.open(err_fifo, os.O_RDONLY | os.O_NONBLOCK)
    io = ProcessIO(Stdio(stdout=str(out_fifo), stderr=str(err_fifo)))
    await io.start(_chunks(b"out\n"), _chunks(), None, None)
    await io.wait_output(timeout=5)
    assert os.read(out_r, 100) == b"out\n"
    assert os.read(out_r, 100) == b""  # EOF: no writer left, before io.close()
    assert os.read(err_r, 100) == b""
    await io.close()  # closing again is harmless
    os.close(out_r)
    os.close(err_r)


async def test_output_waiting_unread_in_the_fifo_is_not_dropped(tmp_path):
    """Regression: the FIFO was written through an O_RDWR fd with asyncio's write-pipe transport,
    which took "readable" (our own unread output) for a closed peer and dropped later chunks;
    `ctr task exec` lost the tail of fast exits (7 of 40 execs)."""
    out_fifo = tmp_path / "out"
    os.mkfifo(out_fifo)
    reader_fd = os.open(out_fifo, os.O_RDONLY | os.O_NONBLOCK)
    parts = [b"head\n", b"body\n", b"tail\n"]

    async def slow_guest():
        await asyncio.sleep(0.05)  # let the loop poll the sink while "head" sits unread
        return parts.pop(0) if parts else b""

    io = ProcessIO(Stdio(stdout=str(out_fifo)))
    await io.start(slow_guest, None, None, None)
    await io.wait_output(timeout=5)
    assert os.read(reader_fd, 100) == b"head\nbody\ntail\n"
    assert os.read(reader_fd, 100) == b""
    await io.close()
    os.close(reader_fd)


async def test_file_uri_appends(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("old\n")
    io = ProcessIO(Stdio(stdout=f"file://{log}", stderr=f"file://{log}"))
    await io.start(_chunks(b"out\n"), _chunks(b"err\n"), None, None)
    await io.wait_output(timeout=5)
    await io.close()
    assert log.read_text().startswith("old\n") and sorted(log.read_text().splitlines()[1:]) == ["err", "out"]


async def test_binary_logger_gets_fd3_and_fd4(tmp_path):
    script = tmp_path / "logger.py"
    dest = tmp_path / "captured"
    script.write_text(
        f"#!{sys.executable}\nimport os,sys\nos.close(5)\n"
        f"o=os.fdopen(3,'rb').read(); e=os.fdopen(4,'rb').read()\n"
        f"open({str(dest)!r},'wb').write(o+b'|'+e+b'|'+os.environ['CONTAINER_ID'].encode()"
        "+b'|'+' '.join(sys.argv[1:]).encode())\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    io = ProcessIO(Stdio(stdout=f"binary://{script}?tag=x", stderr=f"binary://{script}?tag=x"),
                   container_id="c9")
    await io.start(_chunks(b"O"), _chunks(b"E"), None, None)
    await io.wait_output(timeout=5)
    await io.close()
    assert dest.read_bytes() == b"O|E|c9|tag x"


@pytest.mark.parametrize("spec", [Stdio(stdout="http://x"), Stdio(stdin="file:///x"),
                                  Stdio(stdout="/a\x00b")])
def test_bad_stdio_uris(spec):
    with pytest.raises(InvalidArgument):
        validate(spec)
