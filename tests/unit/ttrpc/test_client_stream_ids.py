"""Client stream-id allocation: odd, from a chosen start, wrapping within 32 bits."""
from __future__ import annotations

import asyncio

import pytest

from ttrpc import Client, framing


async def _client(first: int) -> Client:
    reader = asyncio.StreamReader()
    reader.feed_eof()

    class _Writer:
        def write(self, data: bytes) -> None: ...
        def close(self) -> None: ...
        def is_closing(self) -> bool: return True
        async def drain(self) -> None: ...
        async def wait_closed(self) -> None: ...
        def transport(self) -> None: ...

    return Client(reader, _Writer(), first_stream_id=first)  # type: ignore[arg-type]


async def test_first_stream_id_is_used_and_wraps() -> None:
    c = await _client(framing.MAX_STREAM_ID - 2)
    assert c._allocate_id() == framing.MAX_STREAM_ID - 2
    assert c._allocate_id() == framing.MAX_STREAM_ID
    assert c._allocate_id() == 1
    await c.close()


@pytest.mark.parametrize("bad", [0, 2, framing.MAX_STREAM_ID + 2])
async def test_first_stream_id_must_be_odd_and_in_range(bad: int) -> None:
    with pytest.raises(ValueError):
        await _client(bad)
