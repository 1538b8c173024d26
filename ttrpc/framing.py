"""ttrpc 1.1.1 framing: a 10-byte big-endian header (payload length u32, stream id u32,
message type u8, flags u8) followed by the payload. See PROTOCOLS.md §2."""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = 4 * 1024 * 1024
MSG_REQUEST = 1
MSG_RESPONSE = 2
_DISCARD_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    payload: bytes
    oversized: bool = False  # payload was larger than the cap and has been discarded
    length: int = 0


def encode(stream_id: int, msg_type: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


async def read_frame(reader: asyncio.StreamReader, max_payload: int = MAX_PAYLOAD) -> Frame | None:
    """Read one frame; None at a clean EOF between frames.

    Raises asyncio.IncompleteReadError when the peer closes mid-frame. An oversized payload is
    read and dropped in chunks (never buffered whole) and returned with ``oversized=True`` so
    the caller can answer ResourceExhausted on that stream.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    length, stream_id, msg_type, flags = HEADER.unpack(header)
    if length > max_payload:
        remaining = length
        while remaining:
            chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(chunk)
        return Frame(stream_id, msg_type, flags, b"", oversized=True, length=length)
    payload = await reader.readexactly(length) if length else b""
    return Frame(stream_id, msg_type, flags, payload, length=length)
