"""ttrpc server: many requests in flight per connection, responses written as each completes.

Over a Unix socket (:meth:`Server.start_unix`) or any byte stream
(:meth:`Server.serve_connection`: the guest agent serves one over a virtio-serial port).
Protocol errors are answered on the offending stream and the connection keeps serving; only
bytes that cannot be framed (the stream ends mid-frame, the transport fails) end that one
connection. Handler exceptions become wire statuses in one place, ``status_of``
(:func:`common.errors.to_status` by default).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from common import errors
from proto.ttrpc import ttrpc_pb2
from ttrpc import framing
from ttrpc.unix import bind_listening, peer_credentials

log = logging.getLogger(__name__)

StatusOf = Callable[[BaseException], tuple[int, str]]
Peer = tuple[int, int, int]
_CLOSE_GRACE = 1.0  # seconds to flush a closing connection's output before aborting it


@dataclass
class ServerContext:
    """What a handler knows about the call it serves."""

    service: str = ""
    method: str = ""
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None  # asyncio loop.time() based; None: no deadline
    peer: Peer | None = None  # (pid, uid, gid) from SO_PEERCRED; None off Unix sockets

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), None without a deadline."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()


Handler = Callable[[Message, ServerContext], Awaitable[Message]]


@dataclass(frozen=True)
class _Method:
    request_type: type[Message]
    handler: Handler
    response_descriptor: Descriptor | None = None  # checked when known (register_service)


def _safe_status(status_of: StatusOf, exc: BaseException) -> tuple[int, str]:
    try:
        code, message = status_of(exc)
        return int(code), str(message)
    except Exception:  # a broken mapper must not kill the connection
        log.exception("status_of failed on %r", exc)
        return int(errors.Code.INTERNAL), f"{type(exc).__name__}: {exc}"


class _Connection:
    """One client connection: a reader loop plus one task per request in flight."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: Peer | None) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.tasks: set[asyncio.Task[None]] = set()
        self.write_lock = asyncio.Lock()

    async def run(self) -> None:
        try:
            while True:
                frame = await framing.read_frame(self.reader, self.server.max_payload,
                                                 accept=(framing.MSG_REQUEST,))
                if frame is None:
                    break
                self._on_request(frame)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.debug("ttrpc connection ended: %r", exc)
        except Exception:
            log.exception("ttrpc connection failed")
        finally:
            await self._shutdown()

    def _on_request(self, frame: framing.Frame) -> None:
        sid = frame.stream_id
        if frame.oversized:
            self._spawn(self._answer(sid, int(errors.Code.RESOURCE_EXHAUSTED),
                                     f"message length {frame.length} exceeds maximum message size "
                                     f"of {self.server.max_payload}"))
        elif sid % 2 == 0:
            self._spawn(self._answer(sid, int(errors.Code.INVALID_ARGUMENT),
                                     f"stream id {sid} must be odd for client initiated streams"))
        else:
            self._spawn(self._serve(sid, frame.payload))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        while self.tasks:
            await asyncio.wait(list(self.tasks))
        self.writer.close()
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()
        except Exception:
            pass  # already broken, or a writer without close tracking (NotImplementedError)

    async def _answer(self, sid: int, code: int, message: str, payload: bytes = b"") -> None:
        resp = ttrpc_pb2.Response(payload=payload)
        if code:
            resp.status.code = code
            resp.status.message = message
        data = resp.SerializeToString()
        if len(data) > self.server.max_payload:
            log.warning("stream %d: response of %d bytes exceeds %d", sid, len(data), self.server.max_payload)
            resp = ttrpc_pb2.Response()
            resp.status.code = int(errors.Code.RESOURCE_EXHAUSTED)
            resp.status.message = (f"response message length {len(data)} exceeds maximum message size "
                                   f"of {self.server.max_payload}")
            data = resp.SerializeToString()
        frame = framing.encode(sid, framing.MSG_RESPONSE, data)
        try:
            async with self.write_lock:
                self.writer.write(frame)
                await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            log.debug("cannot answer stream %d: %r", sid, exc)

    async def _serve(self, sid: int, data: bytes) -> None:
        code, message, payload = await self._call(data)
        await self._answer(sid, code, message, payload)

    async def _call(self, data: bytes) -> tuple[int, str, bytes]:
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(data)
        except DecodeError as exc:
            return int(errors.Code.INVALID_ARGUMENT), f"invalid ttrpc request: {exc}", b""
        method = self.server.lookup(req.service, req.method)
        if method is None:
            return (int(errors.Code.UNIMPLEMENTED),
                    f"service {req.service}: method {req.method} not implemented", b"")
        request = method.request_type()
        try:
            request.ParseFromString(req.payload)
        except DecodeError as exc:
            return (int(errors.Code.INVALID_ARGUMENT),
                    f"{req.service}/{req.method}: invalid request payload: {exc}", b"")
        timeout = req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        loop = asyncio.get_running_loop()
        ctx = ServerContext(req.service, req.method, metadata,
                            None if timeout is None else loop.time() + timeout, self.peer)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                response = await method.handler(request, ctx)
            return 0, "", self._serialize(method, response)
        except TimeoutError as exc:
            if deadline.expired():
                # the caller gave up: say so where the server's log is read (the guest console)
                log.warning("%s/%s: the caller's deadline of %.1fs passed; handler cancelled",
                            req.service, req.method, timeout or 0.0)
                return int(errors.Code.DEADLINE_EXCEEDED), f"{req.service}/{req.method}: deadline exceeded", b""
            return self._failed(req, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the connection is closing
            return self._failed(req, exc)  # the handler itself gave up with CancelledError
        except Exception as exc:
            return self._failed(req, exc)

    @staticmethod
    def _serialize(method: _Method, response: object) -> bytes:
        if not isinstance(response, Message):
            raise errors.Internal(f"handler returned {type(response).__name__}, not a protobuf message")
        want = method.response_descriptor
        if want is not None and response.DESCRIPTOR.full_name != want.full_name:
            raise errors.Internal(f"handler returned {response.DESCRIPTOR.full_name}, want {want.full_name}")
        return response.SerializeToString()

    def _failed(self, req: ttrpc_pb2.Request, exc: BaseException) -> tuple[int, str, bytes]:
        code, message = _safe_status(self.server.status_of, exc)
        if errors.is_internal(code):
            log.error("%s/%s failed", req.service, req.method, exc_info=exc)
        return code, message, b""


class Server:
    def __init__(self, *, max_payload: int = framing.MAX_PAYLOAD, check_peercred: bool = True,
                 status_of: StatusOf = errors.to_status) -> None:
        self.max_payload = max_payload
        self.check_peercred = check_peercred
        self.status_of = status_of
        self.on_connection_closed: Callable[[], None] | None = None
        self._methods: dict[tuple[str, str], _Method] = {}
        self._listeners: list[asyncio.base_events.Server] = []
        self._paths: list[str] = []  # socket files we created (removed by close())
        self._closed = False
        self._connections: set[asyncio.Task[None]] = set()  # one _Connection.run() each
        self._acceptors: set[asyncio.Task[None]] = set()  # start_unix's per-connection callbacks

    # -- registration -----------------------------------------------------------------------
    def register(self, service: str, method: str, request_type: type[Message], handler: Handler) -> None:
        self._methods[(service, method)] = _Method(request_type, handler)

    def register_service(self, descriptor: ServiceDescriptor, impl: object) -> None:
        """Bind each RPC of ``descriptor`` to ``impl.<RpcName>(request, ctx)`` when impl has it;
        the others stay unregistered and answer Unimplemented."""
        for m in descriptor.methods:
            handler = getattr(impl, m.name, None)
            if handler is None or not callable(handler):
                continue
            self._methods[(descriptor.full_name, m.name)] = _Method(
                message_factory.GetMessageClass(m.input_type), handler, m.output_type)

    def lookup(self, service: str, method: str) -> _Method | None:
        return self._methods.get((service, method))

    # -- serving ----------------------------------------------------------------------------
    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start_unix(self, path: str | None = None, *, sock: socket.socket | None = None) -> None:
        """Listen on ``path`` (a stale socket file is replaced, mode 0600; a live one raises
        AlreadyExists) or on ``sock``, an already bound socket (e.g. an fd handed over by the
        parent process). May be called several times to listen on several sockets."""
        if sock is None:
            if path is None:
                raise errors.InvalidArgument("start_unix needs a path or a socket")
            sock = bind_listening(path)
            self._paths.append(path)
        self._closed = False
        self._listeners.append(await asyncio.start_unix_server(self._accept, sock=sock, limit=2**20))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._acceptors.add(task)
        try:
            if self._closed:
                writer.transport.abort()
                return
            sock = writer.get_extra_info("socket")
            peer = peer_credentials(sock) if sock is not None else None
            if self.check_peercred and peer is not None and peer[1] != os.geteuid():
                log.warning("rejecting ttrpc connection from pid %d uid %d", peer[0], peer[1])
                writer.transport.abort()
                return
            await self.serve_connection(reader, writer, peer=peer)
        except asyncio.CancelledError:
            # Only the event loop shutting down cancels this task (close() cancels the
            # connection, not its acceptor); serve_connection has cleaned up. Ending cancelled
            # would make asyncio's start_server callback log a spurious error.
            pass
        finally:
            self._acceptors.discard(task)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                               peer: Peer | None = None) -> None:
        """Serve one byte stream until EOF (or :meth:`close`), then cancel its in-flight
        handlers, close ``writer`` and return. Cancelling the caller does the same, then
        re-raises CancelledError."""
        task = asyncio.create_task(_Connection(self, reader, writer, peer).run(), name="ttrpc-connection")
        self._connections.add(task)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait({task})
            raise
        finally:
            self._connections.discard(task)
            if self.on_connection_closed is not None:
                try:
                    self.on_connection_closed()
                except Exception:
                    log.exception("on_connection_closed hook failed")

    async def close(self) -> None:
        """Stop listening, cancel every in-flight handler, close every connection."""
        self._closed = True
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
        for listener in listeners:
            await listener.wait_closed()
        current = asyncio.current_task()
        conns = [t for t in self._connections if t is not current]
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.wait(conns)
        acceptors = [t for t in self._acceptors if t is not current]
        if acceptors:
            await asyncio.wait(acceptors)
        paths, self._paths = self._paths, []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
