"""ttrpc client: odd stream ids, many calls in flight, one reader task dispatching responses.

Errors are :mod:`common.errors` classes: a non-OK response raises ``from_status(code, message)``;
a call whose deadline passes raises DeadlineExceeded (the deadline is also sent as
``timeout_nano`` so the server stops working on it; a late answer is dropped); a connection
that ends with calls in flight fails them with ConnectionClosed; a request larger than
``max_payload`` raises ResourceExhausted without being sent.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from common import errors
from proto.ttrpc import ttrpc_pb2
from ttrpc import framing

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
_CLOSE_GRACE = 1.0  # seconds to flush our output on close() before aborting the transport


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_payload: int = framing.MAX_PAYLOAD, first_stream_id: int = 1) -> None:
        """``first_stream_id`` (odd): a byte-stream transport that survives the peer's
        reconnects (virtio-serial) should start at a random id, so that a late reply meant
        for the previous connection cannot match a call of this one."""
        if first_stream_id % 2 != 1 or not 1 <= first_stream_id <= framing.MAX_STREAM_ID:
            raise ValueError(f"first_stream_id must be odd and in 1..{framing.MAX_STREAM_ID}")
        self._reader = reader
        self._writer = writer
        self._max_payload = max_payload
        self._next_id = first_stream_id
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop(), name="ttrpc-client-reader")

    @classmethod
    async def connect_unix(cls, path: str, *, timeout: float | None = None) -> Client:
        """Connect to a ttrpc server on a Unix socket (``unix://`` prefix accepted)."""
        path = path.removeprefix("unix://")
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=2**20)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"connect {path}: timed out after {timeout}s") from None
        except OSError as exc:
            raise errors.Unavailable(f"connect {path}: {exc.strerror or exc}") from None
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        """Resolve when the connection has ended (the peer went away or close() was called)."""
        await asyncio.shield(self._done)

    async def close(self) -> None:
        """Close the connection; calls in flight fail with ConnectionClosed. Idempotent."""
        self._closed = True
        if not self._reader_task.done():
            self._reader_task.cancel()
        await asyncio.wait({self._reader_task})
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()
        except Exception:
            pass  # already broken, or a writer without close tracking (NotImplementedError)

    # -- receiving --------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                frame = await framing.read_frame(self._reader, self._max_payload,
                                                 accept=(framing.MSG_RESPONSE,))
                if frame is None:
                    break
                self._deliver(frame)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc!r}"
        except asyncio.CancelledError:
            reason = "client closed"
        except Exception as exc:
            log.exception("ttrpc client reader failed")
            reason = f"ttrpc client reader failed: {exc!r}"
        finally:
            self._closed = True
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(errors.ConnectionClosed(reason))
            self._writer.close()
            if not self._done.done():
                self._done.set_result(None)

    def _deliver(self, frame: framing.Frame) -> None:
        fut = self._pending.pop(frame.stream_id, None)
        if fut is None or fut.done():
            log.debug("dropping response on stream %d: no call waits for it", frame.stream_id)
            return
        if frame.oversized:
            fut.set_exception(errors.ResourceExhausted(
                f"response length {frame.length} exceeds maximum message size of {self._max_payload}"))
            return
        resp = ttrpc_pb2.Response()
        try:
            resp.ParseFromString(frame.payload)
        except DecodeError as exc:
            fut.set_exception(errors.Internal(f"invalid ttrpc response: {exc}"))
            return
        fut.set_result(resp)

    # -- calling ----------------------------------------------------------------------------
    def _allocate_id(self) -> int:
        sid = self._next_id
        while sid in self._pending:
            sid = sid + 2 if sid + 2 <= framing.MAX_STREAM_ID else 1
        nxt = sid + 2
        self._next_id = nxt if nxt <= framing.MAX_STREAM_ID else 1
        return sid

    async def call_raw(self, service: str, method: str, payload: bytes, *, timeout: float | None = None,
                       metadata: dict[str, str] | None = None) -> bytes:
        """Send one request with an already serialized payload; return the response payload."""
        where = f"{service}/{method}"
        if self._closed:
            raise errors.ConnectionClosed(f"{where}: ttrpc client is closed")
        if timeout is not None and timeout <= 0:
            raise errors.DeadlineExceeded(f"{where}: deadline exceeded before sending")
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                timeout_nano=0 if timeout is None else max(1, int(timeout * 1e9)))
        for key, value in (metadata or {}).items():
            req.metadata.add(key=key, value=value)
        data = req.SerializeToString()
        if len(data) > self._max_payload:
            raise errors.ResourceExhausted(
                f"{where}: message length {len(data)} exceeds maximum message size of {self._max_payload}")
        sid = self._allocate_id()
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[sid] = fut
        try:
            async with asyncio.timeout(timeout):
                async with self._write_lock:
                    self._writer.write(framing.encode(sid, framing.MSG_REQUEST, data))
                    await self._writer.drain()
                resp = await fut
        except TimeoutError:
            raise errors.DeadlineExceeded(f"{where}: deadline exceeded after {timeout}s") from None
        except errors.KataColoError:
            raise
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise errors.ConnectionClosed(f"{where}: {exc!r}") from None
        finally:
            if self._pending.get(sid) is fut:
                del self._pending[sid]
        if resp.HasField("status") and resp.status.code != 0:
            raise errors.from_status(resp.status.code, resp.status.message)
        return resp.payload

    async def call(self, service: str, method: str, request: Message, response_type: type[M], *,
                   timeout: float | None = None, metadata: dict[str, str] | None = None) -> M:
        """Call ``service/method`` with ``request``; return the decoded ``response_type``."""
        payload = await self.call_raw(service, method, request.SerializeToString(), timeout=timeout,
                                      metadata=metadata)
        response = response_type()
        try:
            response.ParseFromString(payload)
        except DecodeError as exc:
            raise errors.Internal(f"{service}/{method}: invalid response payload: {exc}") from None
        return response
