"""ttrpc client: odd stream ids, many calls in flight, one reader task dispatching responses."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from proto.ttrpc import ttrpc_pb2
from shim import errors
from ttrpc import framing

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_payload: int = framing.MAX_PAYLOAD) -> None:
        self._reader = reader
        self._writer = writer
        self._max_payload = max_payload
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._done = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect_unix(cls, path: str, *, timeout: float | None = None) -> "Client":
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=2**20)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"connect {path}: timed out") from None
        except OSError as exc:
            raise errors.Unavailable(f"connect {path}: {exc.strerror or exc}") from None
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    async def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                frame = await framing.read_frame(self._reader, self._max_payload)
                if frame is None:
                    break
                if frame.type != framing.MSG_RESPONSE:
                    continue
                fut = self._pending.pop(frame.stream_id, None)
                if fut is None or fut.done():
                    continue  # late answer to a call that timed out
                if frame.oversized:
                    fut.set_exception(errors.ResourceExhausted(
                        f"response of {frame.length} bytes exceeds maximum message size {self._max_payload}"))
                    continue
                resp = ttrpc_pb2.Response()
                try:
                    resp.ParseFromString(frame.payload)
                except DecodeError as exc:
                    fut.set_exception(errors.Internal(f"invalid ttrpc response: {exc}"))
                    continue
                fut.set_result(resp)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "client closed"
        finally:
            self._closed = True
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(errors.ConnectionClosed(reason))
            self._pending.clear()
            self._writer.close()
            if not self._done.done():
                self._done.set_result(None)

    async def call_raw(self, service: str, method: str, payload: bytes, *, timeout: float | None = None,
                       metadata: dict[str, str] | None = None) -> bytes:
        if self._closed:
            raise errors.ConnectionClosed("ttrpc client is closed")
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                timeout_nano=int(timeout * 1e9) if timeout else 0)
        for k, v in (metadata or {}).items():
            req.metadata.add(key=k, value=v)
        data = req.SerializeToString()
        if len(data) > self._max_payload:
            raise errors.ResourceExhausted(
                f"message length {len(data)} exceed maximum message size of {self._max_payload}")
        sid = self._next_id
        self._next_id += 2
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[sid] = fut
        try:
            async with asyncio.timeout(timeout):
                async with self._write_lock:
                    self._writer.write(framing.encode(sid, framing.MSG_REQUEST, data))
                    await self._writer.drain()
                resp = await fut
        except TimeoutError:
            raise errors.DeadlineExceeded(f"{service}/{method}: deadline exceeded after {timeout}s") from None
        except (ConnectionError, OSError) as exc:
            raise errors.ConnectionClosed(f"{service}/{method}: {exc}") from None
        finally:
            self._pending.pop(sid, None)
        if resp.HasField("status") and resp.status.code != 0:
            raise errors.from_status(resp.status.code, resp.status.message)
        return resp.payload

    async def call(self, service: str, method: str, request: Message, response_type: type[M], *,
                   timeout: float | None = None, metadata: dict[str, str] | None = None) -> M:
        payload = await self.call_raw(service, method, request.SerializeToString(), timeout=timeout,
                                      metadata=metadata)
        response = response_type()
        try:
            response.ParseFromString(payload)
        except DecodeError as exc:
            raise errors.Internal(f"{service}/{method}: invalid response payload: {exc}") from None
        return response

    async def close(self) -> None:
        if not self._reader_task.done():
            self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
