"""ttrpc 1.1.1 framing (docs/protocols.md §2).

A frame is a 10-byte big-endian header — payload length u32 (header excluded), stream id u32,
message type u8, flags u8 — followed by the payload. ttrpc 1.1.1 knows two message types,
request (1) and response (2); anything else is read, dropped and skipped.

:func:`read_frame` works over any :class:`asyncio.StreamReader`, so split reads (a frame
arriving byte by byte) and coalesced reads (several frames in one segment) are the reader's
business. A payload longer than ``max_payload`` is consumed in bounded chunks, never buffered
whole, and reported as a :class:`Frame` with ``oversized=True`` so that a server can answer
ResourceExhausted on that stream id and keep serving the connection.
"""
from __future__ import annotations

import asyncio
import struct
from collections.abc import Container
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_STREAM_ID = 0xFFFFFFFF
MSG_REQUEST = 1
MSG_RESPONSE = 2
KNOWN_TYPES: frozenset[int] = frozenset({MSG_REQUEST, MSG_RESPONSE})
DISCARD_CHUNK = 64 * 1024

assert HEADER_SIZE == 10


@dataclass(frozen=True)
class Header:
    length: int
    stream_id: int
    type: int
    flags: int


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    payload: bytes
    oversized: bool = False  # the payload was larger than the cap and has been discarded
    length: int = 0  # payload length announced by the header


def encode_header(length: int, stream_id: int, msg_type: int, flags: int = 0) -> bytes:
    return HEADER.pack(length, stream_id, msg_type, flags)


def decode_header(data: bytes) -> Header:
    """Decode the first HEADER_SIZE bytes of ``data``; ValueError when there are fewer."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"ttrpc header needs {HEADER_SIZE} bytes, got {len(data)}")
    return Header(*HEADER.unpack_from(data))


def encode(stream_id: int, msg_type: int, payload: bytes, flags: int = 0) -> bytes:
    """One complete frame (header + payload)."""
    return HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


async def discard(reader: asyncio.StreamReader, length: int, chunk: int = DISCARD_CHUNK) -> None:
    """Consume and drop ``length`` bytes, at most ``chunk`` buffered at a time."""
    remaining = length
    while remaining:
        data = await reader.read(min(remaining, chunk))
        if not data:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(data)


async def read_frame(reader: asyncio.StreamReader, max_payload: int = MAX_PAYLOAD, *,
                     accept: Container[int] = KNOWN_TYPES) -> Frame | None:
    """Read the next frame whose type is in ``accept``; None at a clean EOF between frames.

    Frames of other types are consumed and skipped (whatever their length). Raises
    :class:`asyncio.IncompleteReadError` when the stream ends in the middle of a frame; other
    reader errors (ConnectionError, OSError) propagate unchanged.
    """
    while True:
        try:
            raw = await reader.readexactly(HEADER_SIZE)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise
        hdr = decode_header(raw)
        if hdr.type not in accept:
            await discard(reader, hdr.length)
            continue
        if hdr.length > max_payload:
            await discard(reader, hdr.length)
            return Frame(hdr.stream_id, hdr.type, hdr.flags, b"", oversized=True, length=hdr.length)
        payload = await reader.readexactly(hdr.length) if hdr.length else b""
        return Frame(hdr.stream_id, hdr.type, hdr.flags, payload, length=hdr.length)
