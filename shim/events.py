"""Ordered publishing of task events to containerd (docs/protocols.md §4).

One queue, one sender task: events leave in exactly the order :meth:`EventPublisher.publish`
was called (create → start → exit → delete; exec-added → exec-started → exit). Each event is
sent as ``containerd.services.events.ttrpc.v1.Events/Forward`` on ``TTRPC_ADDRESS`` with a
bare ``Any.type_url`` (``containerd.events.TaskExit``). A failed send is retried with
exponential backoff on a fresh connection; after ``max_attempts`` the event is dropped (and
logged) so one bad event cannot wedge the queue.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from proto.containerd.services.events import ttrpc_pb2
from shim.convert import datetime_to_ts

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"

TOPIC_CREATE = "/tasks/create"
TOPIC_START = "/tasks/start"
TOPIC_EXIT = "/tasks/exit"
TOPIC_DELETE = "/tasks/delete"
TOPIC_OOM = "/tasks/oom"
TOPIC_EXEC_ADDED = "/tasks/exec-added"
TOPIC_EXEC_STARTED = "/tasks/exec-started"
TOPIC_PAUSED = "/tasks/paused"
TOPIC_RESUMED = "/tasks/resumed"


class _Client(Protocol):
    async def call(self, service: str, method: str, request: Any, response_type: Any, *,
                   timeout: float | None = ...) -> Any: ...

    async def close(self) -> None: ...


Connector = Callable[[str], Awaitable[_Client]]


async def _connect_ttrpc(address: str) -> _Client:
    from ttrpc import Client  # imported lazily: `delete` never needs it

    return await Client.connect_unix(address, timeout=5.0)


@dataclass(frozen=True)
class Envelope:
    topic: str
    event: Message
    timestamp: datetime


def envelope_request(namespace: str, env: Envelope) -> ttrpc_pb2.ForwardRequest:
    req = ttrpc_pb2.ForwardRequest()
    e = req.envelope
    datetime_to_ts(env.timestamp, e.timestamp)
    e.namespace = namespace
    e.topic = env.topic
    e.event.CopyFrom(any_pb2.Any(type_url=env.event.DESCRIPTOR.full_name,
                                 value=env.event.SerializeToString()))
    return req


class EventPublisher:
    """``publish()`` never blocks; ``close()`` drains (bounded) and stops the sender."""

    def __init__(self, address: str, namespace: str, *, connect: Connector = _connect_ttrpc,
                 max_attempts: int = 6, backoff: float = 0.05, max_backoff: float = 2.0,
                 call_timeout: float = 5.0) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._connect = connect
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._call_timeout = call_timeout
        self._queue: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self._client: _Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-publisher")

    def publish(self, topic: str, event: Message) -> None:
        self._queue.put_nowait(Envelope(topic, event, datetime.now(UTC)))

    async def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (up to ``timeout``), then stop."""
        if self._task is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                log.warning("event publisher: %d event(s) not sent at close", self._queue.qsize())
            self._task = None
        await self._drop_client()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    async def _run(self) -> None:
        while True:
            env = await self._queue.get()
            if env is None:
                return
            await self._send(env)

    async def _send(self, env: Envelope) -> None:
        if not self.address:
            log.debug("no TTRPC_ADDRESS: dropping %s", env.topic)
            self.dropped += 1
            return
        req = envelope_request(self.namespace, env)
        delay = self._backoff
        for attempt in range(1, self._max_attempts + 1):
            try:
                if self._client is None:
                    self._client = await self._connect(self.address)
                await self._client.call(EVENTS_SERVICE, "Forward", req, empty_pb2.Empty,
                                        timeout=self._call_timeout)
                self.sent += 1
                log.debug("published %s", env.topic)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any transport/status error is retried
                log.warning("publish %s attempt %d/%d failed: %s", env.topic, attempt,
                            self._max_attempts, exc)
                await self._drop_client()
                if attempt < self._max_attempts:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_backoff)
        self.dropped += 1
        log.error("dropping event %s after %d attempts", env.topic, self._max_attempts)
