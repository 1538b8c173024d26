"""Fixtures for shim unit tests: a capture 'containerd' Events server and a TaskService with the
host test backend served by the real ttrpc Server over a socketpair (tests.support.task_harness)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes.event_sink import EventSink
from tests.fakes.host_process_backend import HostProcessBackend
from tests.support.task_harness import ShimHarness, event_sink_server, task_harness, write_bundle

__all__ = ["ShimHarness", "write_bundle"]


@pytest.fixture
async def event_sink(tmp_path: Path) -> AsyncIterator[tuple[EventSink, str]]:
    path = str(tmp_path / "ctd.sock.ttrpc")
    async with event_sink_server(path) as sink:
        yield sink, path


@pytest.fixture
async def shim(tmp_path: Path) -> AsyncIterator[ShimHarness]:
    async with task_harness(tmp_path, HostProcessBackend) as h:
        yield h
