"""A typed wrapper over ``qemu.qmp.QMPClient`` for one VM's QMP socket.

- ``connect`` retries until the socket exists and answers, bounded by a deadline. The socket is
  connected here and handed to the library, so failed attempts do not log library errors.
- ``execute`` bounds each command with a timeout; QMP errors become HypervisorError, timeouts
  DeadlineExceeded, a lost connection ConnectionClosed.
- One pump task drains the library's default event queue and calls listeners registered with
  ``add_listener(name, callback)`` (SHUTDOWN, STOP, RESUME, BALLOON_CHANGE, DEVICE_DELETED, ...).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError

from common.errors import ConnectionClosed, DeadlineExceeded, HypervisorError

log = logging.getLogger(__name__)

# The library logs every session step at DEBUG and connection failures at ERROR; a shim running
# with DEBUG logging would drown in it. Keep it at WARNING unless someone configured it.
_qmp_logger = logging.getLogger("qemu.qmp")
if _qmp_logger.level == logging.NOTSET:
    _qmp_logger.setLevel(logging.WARNING)

EventCallback = Callable[[dict[str, Any]], None]
DEFAULT_COMMAND_TIMEOUT = 10.0


@dataclass(frozen=True)
class CpuInfo:
    cpu_index: int
    thread_id: int
    props: dict[str, Any] = field(default_factory=dict)
    qom_path: str = ""


class QmpMonitor:
    def __init__(self, path: str, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self.path = path
        self.command_timeout = command_timeout
        self._qmp: QMPClient | None = None
        self._pump: asyncio.Task[None] | None = None
        self._listeners: dict[str, list[EventCallback]] = {}

    @property
    def connected(self) -> bool:
        return self._qmp is not None

    # -- connection ---------------------------------------------------------------------------

    async def connect(self, timeout: float, interval: float = 0.05) -> None:
        """Connect and negotiate, retrying until ``timeout`` seconds have passed."""
        if self._qmp is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error: BaseException | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"QMP socket {self.path} not answering after {timeout:.1f}s"
                                       f" (last error: {last_error})")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, self.path), remaining)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                last_error = exc
                await asyncio.sleep(min(interval, max(deadline - loop.time(), 0)))
                continue
            except TimeoutError:
                sock.close()
                continue
            except OSError as exc:
                sock.close()
                raise HypervisorError(f"cannot connect to QMP socket {self.path}: {exc}") from None
            qmp = QMPClient()
            try:
                # The greeting only comes once QEMU's main loop runs: this wait is part of boot.
                await asyncio.wait_for(qmp.connect(sock), max(deadline - loop.time(), 0.01))
            except TimeoutError:
                sock.close()
                raise DeadlineExceeded(f"QMP on {self.path} gave no greeting within {timeout:.1f}s") from None
            except QMPError as exc:
                sock.close()
                raise ConnectionClosed(f"QMP session on {self.path} failed: {exc}") from None
            self._qmp = qmp
            self._pump = asyncio.create_task(self._pump_events(qmp), name=f"qmp-events {self.path}")
            return

    async def close(self) -> None:
        """Disconnect (idempotent). Errors from an already dead peer are ignored."""
        qmp, self._qmp = self._qmp, None
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        if qmp is not None:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    # -- events -------------------------------------------------------------------------------

    def add_listener(self, name: str, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every event named ``name`` (``*`` = every event)."""
        self._listeners.setdefault(name, []).append(callback)

    def remove_listener(self, name: str, callback: EventCallback) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._listeners[name].remove(callback)

    def dispatch(self, event: Mapping[str, Any]) -> None:
        """Deliver one event to its listeners; a failing listener does not stop the others."""
        ev = dict(event)
        for callback in list(self._listeners.get(str(ev.get("event")), ())) + list(
                self._listeners.get("*", ())):
            try:
                callback(ev)
            except Exception:  # noqa: BLE001 - a listener bug must not kill the pump
                log.exception("QMP event listener for %s failed", ev.get("event"))

    async def _pump_events(self, qmp: QMPClient) -> None:
        async for event in qmp.events:
            self.dispatch(event)

    async def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool],
                         timeout: float) -> dict[str, Any]:
        """Wait for the next event ``name`` satisfying ``match`` (register before triggering it:
        use :meth:`expect_event`)."""
        async with self.expect_event(name, match) as fut:
            return await self._await(fut, timeout, f"event {name}")

    @contextlib.asynccontextmanager
    async def expect_event(self, name: str, match: Callable[[dict[str, Any]], bool]
                           ) -> AsyncIterator[asyncio.Future[dict[str, Any]]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_event(ev: dict[str, Any]) -> None:
            if not fut.done() and match(ev):
                fut.set_result(ev)

        self.add_listener(name, on_event)
        try:
            yield fut
        finally:
            self.remove_listener(name, on_event)

    @staticmethod
    async def _await(fut: asyncio.Future[dict[str, Any]], timeout: float, what: str) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"QMP: no {what} within {timeout:.1f}s") from None

    # -- commands -----------------------------------------------------------------------------

    def _client(self) -> QMPClient:
        if self._qmp is None:
            raise ConnectionClosed(f"QMP on {self.path} is not connected")
        return self._qmp

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None,
                      timeout: float | None = None) -> Any:
        qmp = self._client()
        limit = self.command_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(qmp.execute(cmd, args), limit)
        except TimeoutError:
            raise DeadlineExceeded(f"QMP {cmd} did not answer within {limit:.1f}s") from None
        except ExecuteError as exc:
            raise HypervisorError(f"QMP {cmd} failed: {exc.error_class}: {exc}") from None
        except ExecInterruptedError as exc:
            raise ConnectionClosed(f"QMP connection lost during {cmd}: {exc}") from None
        except QMPError as exc:
            raise ConnectionClosed(f"QMP {cmd}: {exc}") from None

    async def query_status(self) -> dict[str, Any]:
        return dict(await self.execute("query-status"))

    async def query_cpus_fast(self) -> list[CpuInfo]:
        cpus = await self.execute("query-cpus-fast")
        return [CpuInfo(cpu_index=int(c["cpu-index"]), thread_id=int(c["thread-id"]),
                        props=dict(c.get("props", {})), qom_path=str(c.get("qom-path", "")))
                for c in cpus]

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def quit(self) -> None:
        """Ask QEMU to exit. The connection dropping before/after the answer is success."""
        with contextlib.suppress(ConnectionClosed):
            await self.execute("quit")

    async def balloon(self, value: int) -> None:
        await self.execute("balloon", {"value": int(value)})

    async def query_balloon(self) -> int:
        return int((await self.execute("query-balloon"))["actual"])

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def qom_set(self, path: str, prop: str, value: object) -> None:
        await self.execute("qom-set", {"path": path, "property": prop, "value": value})

    async def send_fd(self, fd: int, name: str) -> None:
        """Pass ``fd`` over SCM_RIGHTS and name it with ``getfd`` (the caller keeps its fd)."""
        qmp = self._client()
        try:
            qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise HypervisorError(f"QMP: cannot pass fd {fd}: {exc}") from None
        await self.execute("getfd", {"fdname": name})

    async def closefd(self, name: str) -> None:
        await self.execute("closefd", {"fdname": name})

    async def netdev_add(self, netdev_type: str, netdev_id: str, **props: object) -> None:
        await self.execute("netdev_add", {"type": netdev_type, "id": netdev_id, **props})

    async def netdev_del(self, netdev_id: str) -> None:
        await self.execute("netdev_del", {"id": netdev_id})

    async def device_add(self, driver: str, dev_id: str, **props: object) -> None:
        await self.execute("device_add", {"driver": driver, "id": dev_id, **props})

    async def device_del(self, dev_id: str, timeout: float = 10.0) -> None:
        """Request unplug and wait for DEVICE_DELETED of exactly ``dev_id``."""
        async with self.expect_event("DEVICE_DELETED",
                                     lambda ev: ev.get("data", {}).get("device") == dev_id) as fut:
            await self.execute("device_del", {"id": dev_id})
            await self._await(fut, timeout, f"DEVICE_DELETED for {dev_id}")

    async def object_add(self, qom_type: str, obj_id: str, **props: object) -> None:
        await self.execute("object-add", {"qom-type": qom_type, "id": obj_id, **props})

    async def object_del(self, obj_id: str) -> None:
        await self.execute("object-del", {"id": obj_id})

    async def blockdev_add(self, spec: Mapping[str, object]) -> None:
        await self.execute("blockdev-add", spec)

    async def blockdev_del(self, node_name: str) -> None:
        await self.execute("blockdev-del", {"node-name": node_name})

    async def query_pci(self) -> list[dict[str, Any]]:
        """``query-pci``: every PCI bus with its devices (``qom_path``/``qdev_id``, ``slot``,
        ``function``, ``pci_bridge`` with the bus behind a bridge or root port)."""
        return list(await self.execute("query-pci"))


def pci_path(buses: list[dict[str, Any]], qdev_id: str) -> str:
    """kata's guest PCI path of device ``qdev_id`` from ``query-pci``: the slot of each bridge
    or root port on the way, then the device's slot, as ``"02/00"`` (hex, ``/``-separated).
    "" when the device is not on any bus."""

    def walk(devices: list[dict[str, Any]], prefix: list[int]) -> list[int] | None:
        for dev in devices:
            here = [*prefix, int(dev.get("slot", 0))]
            if dev.get("qdev_id") == qdev_id:
                return here
            bridge = dev.get("pci_bridge") or {}
            below = (bridge.get("bus") or {}).get("devices") or bridge.get("devices") or []
            found = walk(list(below), here)
            if found is not None:
                return found
        return None

    for bus in buses:
        found = walk(list(bus.get("devices") or []), [])
        if found is not None:
            return "/".join(f"{slot:02x}" for slot in found)
    return ""
