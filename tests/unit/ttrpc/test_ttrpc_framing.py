from __future__ import annotations

import asyncio
import struct

import pytest

from ttrpc import framing


def test_header_layout_is_big_endian_10_bytes() -> None:
    data = framing.encode(0x01020304, framing.MSG_RESPONSE, b"xyz", flags=0)
    assert framing.HEADER_SIZE == 10
    assert data == b"\x00\x00\x00\x03" + b"\x01\x02\x03\x04" + b"\x02" + b"\x00" + b"xyz"
    hdr = framing.decode_header(data)
    assert (hdr.length, hdr.stream_id, hdr.type, hdr.flags) == (3, 0x01020304, 2, 0)
    with pytest.raises(ValueError):
        framing.decode_header(data[:9])
    assert framing.MAX_PAYLOAD == 4 * 1024 * 1024
    assert (framing.MSG_REQUEST, framing.MSG_RESPONSE) == (1, 2)


def _reader(*chunks: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    for c in chunks:
        r.feed_data(c)
    if eof:
        r.feed_eof()
    return r


async def test_coalesced_frames_and_clean_eof() -> None:
    data = b"".join(framing.encode(i, framing.MSG_REQUEST, bytes([i]) * i) for i in (1, 3, 5))
    r = _reader(data)
    frames = [await framing.read_frame(r) for _ in range(3)]
    assert [(f.stream_id, f.payload) for f in frames if f] == [(1, b"\1"), (3, b"\3" * 3), (5, b"\5" * 5)]
    assert await framing.read_frame(r) is None


async def test_split_byte_by_byte() -> None:
    data = framing.encode(7, framing.MSG_REQUEST, b"hello world")
    r = asyncio.StreamReader()
    task = asyncio.create_task(framing.read_frame(r))
    for b in data:
        await asyncio.sleep(0)
        assert not task.done()
        r.feed_data(bytes([b]))
    frame = await asyncio.wait_for(task, 1)
    assert frame is not None and (frame.stream_id, frame.payload) == (7, b"hello world")


async def test_zero_length_payload() -> None:
    frame = await framing.read_frame(_reader(framing.encode(9, framing.MSG_RESPONSE, b"")))
    assert frame is not None and frame.payload == b"" and frame.length == 0


async def test_eof_mid_header_and_mid_payload_raise() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await framing.read_frame(_reader(b"\0\0\0"))
    with pytest.raises(asyncio.IncompleteReadError):
        await framing.read_frame(_reader(framing.encode(1, 1, b"abcdef")[:-2]))
    with pytest.raises(asyncio.IncompleteReadError):  # oversized and cut short while discarding
        await framing.read_frame(_reader(struct.pack(">IIBB", 100, 1, 1, 0) + b"x" * 50), 10)


async def test_oversized_is_discarded_in_bounded_chunks_and_reported() -> None:
    big = 3 * framing.DISCARD_CHUNK + 17
    r = asyncio.StreamReader(limit=framing.DISCARD_CHUNK)
    nxt = framing.encode(5, framing.MSG_REQUEST, b"next")
    max_buffered = 0

    async def feed() -> None:
        nonlocal max_buffered
        r.feed_data(struct.pack(">IIBB", big, 3, framing.MSG_REQUEST, 0))
        sent = 0
        while sent < big:
            n = min(4096, big - sent)
            r.feed_data(b"\xaa" * n)
            sent += n
            max_buffered = max(max_buffered, len(r._buffer))  # what the reader holds at once
            await asyncio.sleep(0)
        r.feed_data(nxt)
        r.feed_eof()

    feeder = asyncio.create_task(feed())
    frame = await framing.read_frame(r, max_payload=1024)
    assert frame is not None and frame.oversized and frame.stream_id == 3 and frame.length == big
    assert frame.payload == b""
    frame = await framing.read_frame(r, max_payload=1024)
    assert frame is not None and (frame.stream_id, frame.payload, frame.oversized) == (5, b"next", False)
    await feeder
    assert max_buffered < big // 2  # never held whole


async def test_unknown_types_are_skipped_whatever_their_length() -> None:
    data = (framing.encode(1, 3, b"streaming data")  # ttrpc >= 1.2 data frame
            + struct.pack(">IIBB", 50, 1, 0x7F, 0) + b"z" * 50  # longer than max_payload below
            + framing.encode(1, framing.MSG_RESPONSE, b"ok"))
    frame = await framing.read_frame(_reader(data), max_payload=20)
    assert frame is not None and (frame.type, frame.payload) == (framing.MSG_RESPONSE, b"ok")


async def test_accept_filters_known_types_too() -> None:
    data = framing.encode(2, framing.MSG_RESPONSE, b"r") + framing.encode(1, framing.MSG_REQUEST, b"q")
    frame = await framing.read_frame(_reader(data), accept=(framing.MSG_REQUEST,))
    assert frame is not None and (frame.stream_id, frame.payload) == (1, b"q")
