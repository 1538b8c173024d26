"""SO_PEERCRED: connections from another uid are closed unanswered (needs root to switch uid)."""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest
from ttrpc_testlib import TASK, TaskImpl, request_bytes

from ttrpc import Server, framing

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")

_CHILD = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(10)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    data = s.recv(100)
except (BrokenPipeError, ConnectionResetError):  # closed on us
    data = b""
print("answered" if data else "closed")
"""


async def _call_as(uid: int, path: str) -> str:
    frame = framing.encode(1, framing.MSG_REQUEST, request_bytes()).hex()
    for python in ("/usr/bin/python3", sys.executable):  # one the other uid may execute
        try:
            proc = await asyncio.create_subprocess_exec(python, "-I", "-c", _CHILD, path, frame, user=uid,
                                                        stdout=asyncio.subprocess.PIPE, cwd="/")
            break
        except (FileNotFoundError, PermissionError):
            continue
    else:
        pytest.skip("no python interpreter executable by another uid")
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    return out.decode().strip()


@pytest.mark.parametrize(("check", "expected"), [(True, "closed"), (False, "answered")])
async def test_other_uid_is_rejected_only_when_checking(check: bool, expected: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kc-peercred-", dir="/tmp"))
    tmp.chmod(0o755)
    server = Server(check_peercred=check)
    server.register_service(TASK, TaskImpl())
    path = str(tmp / "p.sock")
    await server.start_unix(path)
    os.chmod(path, 0o777)  # let uid 65534 reach it: only SO_PEERCRED can stop it now
    try:
        assert await _call_as(65534, path) == expected
        assert await _call_as(os.geteuid(), path) == "answered"
    finally:
        await server.close()
        tmp.rmdir()
