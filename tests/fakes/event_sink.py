"""A stand-in for containerd's side of containerd.services.events.ttrpc.v1.Events/Forward:
serve it with the real ttrpc Server and it records every envelope the shim publishes."""
from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import empty_pb2

from proto.containerd.events import task_pb2 as events_pb2
from proto.containerd.services.events import ttrpc_pb2 as evsvc_pb2


class EventSink:
    """containerd's side of Events/Forward: records every envelope it receives."""

    def __init__(self) -> None:
        self.envelopes: list[evsvc_pb2.Envelope] = []
        self.arrived = asyncio.Condition()
        self.fail_next = 0

    async def Forward(self, req: evsvc_pb2.ForwardRequest, ctx: Any) -> empty_pb2.Empty:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected failure")
        async with self.arrived:
            self.envelopes.append(req.envelope)
            self.arrived.notify_all()
        return empty_pb2.Empty()

    @property
    def topics(self) -> list[str]:
        return [e.topic for e in self.envelopes]

    def decoded(self) -> list[tuple[str, Any]]:
        out = []
        for e in self.envelopes:
            cls = getattr(events_pb2, e.event.type_url.rsplit(".", 1)[-1])
            msg = cls()
            msg.ParseFromString(e.event.value)
            out.append((e.topic, msg))
        return out

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.envelopes) >= n)
