"""Peer credentials on the management socket: the admin rule, and a real non-root peer (a forked
child that setuid()s to nobody before it connects) refused with 403 while root is served."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile

import pytest

from shim.mgmt import auth
from shim.mgmt.server import MgmtServer
from tests.unit.mgmt.conftest import FakeSandbox, table_with

NOBODY = 65534


def test_admin_rule(tmp_path):
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "status").write_text("Name:\tx\nGroups:\t4 27 1234\n")
    assert auth.is_admin((1, 0, 0), 0, str(proc))
    assert not auth.is_admin((77, 1000, 1000), 0, str(proc))  # admin_gid 0: root only
    assert auth.is_admin((77, 1000, 1234), 1234, str(proc))  # primary group
    assert auth.is_admin((77, 1000, 1000), 1234, str(proc))  # supplementary group
    assert not auth.is_admin((77, 1000, 1000), 999, str(proc))
    assert not auth.is_admin(None, 1234, str(proc))


def _child_request(path: str, fd: int) -> None:
    """In the forked child: drop to nobody, send one HTTP request, write the status line."""
    status = b"child failed"
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"GET /colo/sandbox HTTP/1.1\r\nHost: shim\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        status = data.split(b"\r\n", 1)[0] + b"\n" + data.split(b"\r\n\r\n", 1)[-1]
    except BaseException as exc:  # noqa: BLE001 - reported to the parent through the pipe
        status = f"child error: {exc!r}".encode()
    finally:
        os.write(fd, status)
        os._exit(0)


@pytest.fixture
async def open_server():
    """A management server in a world-traversable directory with its socket loosened to 0666:
    the peer-credential check must hold on its own."""
    state = tempfile.mkdtemp(prefix="kc-auth-", dir="/tmp")
    os.chmod(state, 0o755)
    server = MgmtServer(sandbox_id="sb-auth", state_dir=state, sandbox=FakeSandbox("sb-auth"), table=table_with())
    await server.start()
    os.chmod(server.path, 0o666)
    yield server
    await server.close()
    shutil.rmtree(state, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid a child")
async def test_non_root_peer_gets_403(open_server):
    server = open_server
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        _child_request(server.path, w)
    os.close(w)
    await asyncio.to_thread(os.waitpid, pid, 0)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    assert out.startswith("HTTP/1.1 403"), out
    assert f"uid {NOBODY}" in out and "allowed: root" in out
    # root is still served, and by the same server
    from tests.unit.mgmt.test_admin_routes import call

    status, _ = await call(server, "GET", "/colo/sandbox")
    assert status == 200


def test_open_access_with_an_admin_group(tmp_path):
    d = tmp_path / "sb"
    d.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    path = str(d / "shim-monitor.sock")
    sock.bind(path)
    try:
        os.chmod(path, 0o600)
        auth.open_access(path, 0)
        assert os.stat(path).st_mode & 0o777 == 0o600
        if os.geteuid() == 0:
            auth.open_access(path, 4321)
            st = os.stat(path)
            assert st.st_mode & 0o777 == 0o660 and st.st_gid == 4321
            assert os.stat(d).st_mode & 0o777 == 0o710 and os.stat(d).st_gid == 4321
    finally:
        sock.close()
