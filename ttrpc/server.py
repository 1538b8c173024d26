"""ttrpc server: many requests in flight per connection, responses written as each completes.

Over a Unix socket (``start_unix``) or any byte stream (``serve_connection``: the guest agent
serves one over a virtio-serial port). Protocol errors are answered on the offending stream and
the connection keeps serving; only bytes that cannot be framed end that one connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from proto.ttrpc import ttrpc_pb2
from shim import errors
from ttrpc import framing

log = logging.getLogger(__name__)

Handler = Callable[[Message, "ServerContext"], Awaitable[Message]]
StatusOf = Callable[[BaseException], tuple[int, str]]


@dataclass
class ServerContext:
    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None  # loop.time() based
    peer: tuple[int, int, int] | None = None  # (pid, uid, gid)


@dataclass
class _Method:
    request_type: type[Message]
    handler: Handler


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class _Connection:
    def __init__(self, server: "Server", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: tuple[int, int, int] | None) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.tasks: set[asyncio.Task[None]] = set()
        self.write_lock = asyncio.Lock()

    async def send(self, stream_id: int, code: int, message: str, payload: bytes = b"") -> None:
        resp = ttrpc_pb2.Response(payload=payload)
        if code:
            resp.status.code = code
            resp.status.message = message
        data = framing.encode(stream_id, framing.MSG_RESPONSE, resp.SerializeToString())
        async with self.write_lock:
            self.writer.write(data)
            await self.writer.drain()

    async def run(self) -> None:
        try:
            while True:
                frame = await framing.read_frame(self.reader, self.server.max_payload)
                if frame is None:
                    break
                if frame.type != framing.MSG_REQUEST:
                    continue  # responses/unknown types from a client are ignored
                if frame.oversized:
                    self._spawn(self.send(frame.stream_id, errors.Code.RESOURCE_EXHAUSTED,
                                          f"message length {frame.length} exceed maximum message size of "
                                          f"{self.server.max_payload}"))
                    continue
                if frame.stream_id % 2 == 0:
                    self._spawn(self.send(frame.stream_id, errors.Code.INVALID_ARGUMENT,
                                          f"StreamID {frame.stream_id} must be odd for client initiated streams"))
                    continue
                self._spawn(self._dispatch(frame))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.debug("ttrpc connection ended: %s", exc)
        finally:
            for t in list(self.tasks):
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _dispatch(self, frame: framing.Frame) -> None:
        sid = frame.stream_id
        try:
            code, msg, payload = await self._handle(frame)
        except asyncio.CancelledError:
            raise
        try:
            await self.send(sid, code, msg, payload)
        except (ConnectionError, OSError, RuntimeError) as exc:
            log.debug("cannot answer stream %d: %s", sid, exc)

    async def _handle(self, frame: framing.Frame) -> tuple[int, str, bytes]:
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(frame.payload)
        except DecodeError as exc:
            return errors.Code.INVALID_ARGUMENT, f"invalid ttrpc request: {exc}", b""
        method = self.server.methods.get((req.service, req.method))
        if method is None:
            return errors.Code.UNIMPLEMENTED, f"{req.service}/{req.method}: not implemented", b""
        request = method.request_type()
        try:
            request.ParseFromString(req.payload)
        except DecodeError as exc:
            return errors.Code.INVALID_ARGUMENT, f"{req.service}/{req.method}: invalid request: {exc}", b""
        loop = asyncio.get_running_loop()
        timeout = req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        md: dict[str, list[str]] = {}
        for kv in req.metadata:
            md.setdefault(kv.key, []).append(kv.value)
        ctx = ServerContext(req.service, req.method, md,
                            loop.time() + timeout if timeout is not None else None, self.peer)
        try:
            async with asyncio.timeout(timeout):
                response = await method.handler(request, ctx)
            return 0, "", response.SerializeToString()
        except TimeoutError:
            return errors.Code.DEADLINE_EXCEEDED, f"{req.service}/{req.method}: deadline exceeded", b""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # mapped in one place: status_of (shim.errors.to_status)
            code, message = self.server.status_of(exc)
            if code in (errors.Code.INTERNAL, errors.Code.UNKNOWN):
                log.exception("%s/%s failed", req.service, req.method)
            return code, message, b""


class Server:
    def __init__(self, *, max_payload: int = framing.MAX_PAYLOAD, check_peercred: bool = True,
                 status_of: StatusOf = errors.to_status) -> None:
        self.max_payload = max_payload
        self.check_peercred = check_peercred
        self.status_of = status_of
        self.methods: dict[tuple[str, str], _Method] = {}
        self.on_connection_closed: Callable[[], None] | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._path: str | None = None

    def register(self, service: str, method: str, request_type: type[Message], handler: Handler) -> None:
        self.methods[(service, method)] = _Method(request_type, handler)

    def register_service(self, descriptor: ServiceDescriptor, impl: object) -> None:
        for m in descriptor.methods:
            handler = getattr(impl, m.name, None)
            if handler is not None:
                self.register(descriptor.full_name, m.name, message_factory.GetMessageClass(m.input_type), handler)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start_unix(self, path: str | None = None, *, sock: socket.socket | None = None) -> None:
        if sock is None:
            if path is None:
                raise errors.InvalidArgument("start_unix needs a path or a socket")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(128)
            self._path = path
        self._listener = await asyncio.start_unix_server(self._accept, sock=sock, limit=2**20)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else None
        if self.check_peercred and peer is not None and peer[1] != os.geteuid():
            log.warning("rejecting ttrpc connection from uid %d", peer[1])
            writer.close()
            return
        await self.serve_connection(reader, writer, peer=peer)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                               peer: tuple[int, int, int] | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(self, reader, writer, peer).run()
        finally:
            self._connections.discard(task)
            if self.on_connection_closed is not None:
                self.on_connection_closed()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        current = asyncio.current_task()
        conns = [t for t in self._connections if t is not current]
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.gather(*conns, return_exceptions=True)
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None
