from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ttrpc_testlib import TASK, TaskImpl

from ttrpc import Server


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Server, TaskImpl, str]]:
    """A Task server on a Unix socket; closing it must remove the socket and leak nothing."""
    impl = TaskImpl()
    server = Server()
    server.register_service(TASK, impl)
    path = str(tmp_path / "s.sock")
    await server.start_unix(path)
    yield server, impl, path
    await server.close()
    assert not os.path.exists(path)
    assert server.connection_count == 0
