"""The shim's management server: HTTP/1.1 (aiohttp) on ``/run/kata-colo/sbs/<id>/shim-monitor.sock``.

Started by :func:`shim.cli.serve` beside the Task API on the same event loop and stopped before
it. The socket is bound with mode 0600 before listen() (0660 + directory 0710 for
``[runtime] admin_gid``, :func:`shim.mgmt.auth.open_access`); every request's peer credentials
are checked (:mod:`shim.mgmt.auth`); routes and their errors are :mod:`shim.mgmt.admin`. As kata's
shim does, the address is written to ``monitor_address`` in the bundle. A failure to start is
logged and the shim serves the Task API without it (management is never worth a failed pod).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from shim.mgmt import auth
from shim.mgmt.admin import Admin, application
from shim.mgmt.metrics import Histogram, ShimMetrics
from ttrpc.unix import bind_listening

log = logging.getLogger(__name__)

SOCKET_NAME = "shim-monitor.sock"
ADDRESS_FILE = "monitor_address"
SHUTDOWN_TIMEOUT = 2.0


def socket_path(state_dir: str | os.PathLike[str]) -> str:
    return str(Path(state_dir) / SOCKET_NAME)


def write_monitor_address(bundle: str, address: str) -> None:
    """``<bundle>/monitor_address`` = ``unix://<socket>`` (written atomically)."""
    fd, tmp = tempfile.mkstemp(prefix=".monitor_address.", dir=bundle)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(address)
        os.replace(tmp, Path(bundle, ADDRESS_FILE))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class MgmtServer:
    """One sandbox's management socket. ``sandbox`` is None for a backend without a VM."""

    def __init__(self, *, sandbox_id: str, state_dir: str, sandbox: Any | None, table: Any,
                 admin_gid: int = 0, debug_console_enabled: bool = False) -> None:
        self.sandbox_id = sandbox_id
        self.path = socket_path(state_dir)
        self.admin_gid = admin_gid
        self.metrics = ShimMetrics(sandbox, lambda: table.ids())
        self.admin = Admin(sandbox_id, sandbox, table, self.metrics, debug_console_enabled)
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    @property
    def task_rpc(self) -> Histogram:
        return self.metrics.task_rpc

    async def start(self) -> None:
        app = application(self.admin, [auth.middleware(self.admin_gid)])
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            sock = bind_listening(self.path)
            auth.open_access(self.path, self.admin_gid)
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        self._runner = runner
        if self.metrics.sandbox is not None:  # agent RPC latencies (a backend without a VM has no agent)
            from agent_api.client.rpc import AgentClient

            AgentClient.call_observer = self.metrics.observe_agent_rpc
        log.info("management socket %s", self.path)

    async def close(self) -> None:
        if self.metrics.sandbox is not None:
            from agent_api.client.rpc import AgentClient

            if AgentClient.call_observer == self.metrics.observe_agent_rpc:
                AgentClient.call_observer = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self.metrics.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
