"""Fixtures of the Cloud Hypervisor driver tests (helpers in clh_testlib.py)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clh_testlib import FakeVmm, open_queue_fds


@pytest.fixture
def fake_vmm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVmm]:
    """The fake VMM's journal and script; fails the test if any request broke the schema."""
    fake = FakeVmm(tmp_path / "clh-journal.jsonl", tmp_path / "clh-script.json")
    monkeypatch.setenv("FAKE_CLH_JOURNAL", str(fake.journal_path))
    monkeypatch.setenv("FAKE_CLH_SCRIPT", str(fake.script_path))
    yield fake
    assert fake.violations() == [], "the driver broke the Cloud Hypervisor API schema"


@pytest.fixture
def queue_fds() -> Iterator[Any]:
    """``make(name, queues)``: fds of a real non-persistent tap (pipes when not root); closed after."""
    opened: list[int] = []

    def make(name: str, queues: int = 1) -> tuple[int, ...]:
        fds = open_queue_fds(name, queues)
        opened.extend(fds)
        return tuple(fds)

    yield make
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)
