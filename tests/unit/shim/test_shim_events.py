"""The ordered publisher against a real ttrpc Events server (containerd's side)."""
from __future__ import annotations

import asyncio

import pytest

from proto.containerd.events import task_pb2 as events_pb2
from proto.containerd.services.events import ttrpc_pb2 as evsvc_pb2
from shim import events as ev
from tests.fakes.event_sink import EventSink
from ttrpc import Server

pytestmark = pytest.mark.asyncio


async def test_order_envelope_and_bare_type_url(event_sink):
    sink, path = event_sink
    pub = ev.EventPublisher("unix://" + path, "k8s.io", backoff=0.01)
    pub.start()
    for i in range(50):
        pub.publish(ev.TOPIC_EXIT, events_pb2.TaskExit(container_id="c", pid=i))
    pub.publish(ev.TOPIC_OOM, events_pb2.TaskOOM(container_id="c"))
    await pub.close(timeout=5)
    assert [e.topic for e in sink.envelopes] == [ev.TOPIC_EXIT] * 50 + [ev.TOPIC_OOM]
    pids = []
    for e in sink.envelopes[:50]:
        m = events_pb2.TaskExit()
        m.ParseFromString(e.event.value)
        pids.append(m.pid)
    assert pids == list(range(50))
    e = sink.envelopes[-1]
    assert e.event.type_url == "containerd.events.TaskOOM"
    assert e.namespace == "k8s.io" and e.timestamp.seconds > 1_600_000_000
    assert pub.sent == 51 and pub.dropped == 0


async def test_retries_until_containerd_is_up_and_keeps_order(tmp_path):
    path = str(tmp_path / "late.ttrpc")
    pub = ev.EventPublisher(path, "ns", backoff=0.02, max_backoff=0.1, max_attempts=50)
    pub.start()
    pub.publish(ev.TOPIC_CREATE, events_pb2.TaskCreate(container_id="a"))
    pub.publish(ev.TOPIC_START, events_pb2.TaskStart(container_id="a"))
    await asyncio.sleep(0.2)  # nobody listens yet: connect fails, retried
    sink = EventSink()
    sink.fail_next = 2  # and the first two Forward calls fail with a status
    server = Server()
    server.register_service(evsvc_pb2.DESCRIPTOR.services_by_name["Events"], sink)
    await server.start_unix(path)
    try:
        await sink.wait_for(2)
        assert sink.topics == [ev.TOPIC_CREATE, ev.TOPIC_START]
    finally:
        await pub.close()
        await server.close()


async def test_drops_after_max_attempts_then_continues(event_sink):
    sink, path = event_sink
    sink.fail_next = 3
    pub = ev.EventPublisher(path, "ns", backoff=0.001, max_attempts=3)
    pub.start()
    pub.publish(ev.TOPIC_EXIT, events_pb2.TaskExit(container_id="lost"))
    pub.publish(ev.TOPIC_DELETE, events_pb2.TaskDelete(container_id="next"))
    await pub.close(timeout=5)
    assert sink.topics == [ev.TOPIC_DELETE] and pub.dropped == 1
