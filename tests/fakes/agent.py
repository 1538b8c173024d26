"""TEST-ONLY stand-in for :class:`agent_api.client.facade.GuestAgent` (the sandbox's view of the
guest agent): same methods, no VM, scripted by the test.

* Every call is appended to :attr:`FakeGuestAgent.calls` as ``(method, args)``; ``hooks[method]``
  (sync or async) runs first and ``fail[method]`` is raised when set (it stays until removed).
* Processes: ``create_container`` makes a created init, ``start_container``/``exec_process`` start
  one. ``wait_process``/``read_stdout``/``read_stderr`` block like the real calls until the test
  scripts output (:meth:`output`) or an exit (:meth:`exit`: the streams reach EOF, then the wait
  returns the status). ``signal_process`` with a terminating signal makes the process exit with
  128 + signal (``exit_on_signal``), as runc's processes do.
* OOM: :meth:`oom` queues a container id for ``next_oom``.
* Connection lost (the VM died, the socket broke): :meth:`lose_connection`; every blocked and
  every later call raises :class:`~common.errors.ConnectionClosed`, as the ttrpc client does.
  ``close()`` does the same with "client closed".
* ``connect``: answers at once, or with ``connect_hangs=True`` never (the real facade's
  behaviour then: AgentError once ``vm_gone`` is set, DeadlineExceeded-style AgentError after
  ``timeout``).

The sandbox builds its agent with ``agent_factory(address)``: pass :meth:`FakeGuestAgent.factory`.
"""
from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from common.errors import AgentError, ConnectionClosed, NotFound
from hypervisor.base import AgentAddress
from shim.backend import Stats

T = TypeVar("T")
_TERMINATING = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})


@dataclass
class FakeProcess:
    container_id: str
    exec_id: str
    spec: dict[str, Any]
    started: bool = False
    exit: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    stdout: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stderr: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    signals: list[int] = field(default_factory=list)


class FakeGuestAgent:
    def __init__(self, *, connect_hangs: bool = False, exit_on_signal: bool = True,
                 stats: Stats | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BaseException] = {}
        self.hooks: dict[str, Callable[[], Any]] = {}
        self.address: AgentAddress | None = None
        self.connect_hangs = connect_hangs
        self.exit_on_signal = exit_on_signal
        self.stats_result = stats or Stats(cpu_usage_ns=1, memory_usage=2)
        self.sandbox: dict[str, Any] | None = None
        self.containers: dict[str, dict[str, Any]] = {}
        self.storages: dict[str, list[dict[str, Any]]] = {}
        self.devices: dict[str, list[dict[str, Any]]] = {}
        self.procs: dict[tuple[str, str], FakeProcess] = {}
        self.vcpu_priorities: dict[str, list[int]] | None = None
        self.network: tuple[list[dict[str, Any]], ...] | None = None
        self.connected = False
        self._ooms: asyncio.Queue[str] = asyncio.Queue()
        self._lost: asyncio.Future[None] | None = None
        self._lost_reason = ""

    def factory(self, address: AgentAddress) -> FakeGuestAgent:
        """The Sandbox's ``agent_factory``: remembers the address, returns this agent."""
        self.address = address
        return self

    # -- scripting ----------------------------------------------------------------------------

    def _proc(self, container_id: str, exec_id: str) -> FakeProcess:
        p = self.procs.get((container_id, exec_id))
        if p is None:
            raise NotFound(f"process {container_id}/{exec_id or 'init'} not found")
        return p

    def output(self, container_id: str, exec_id: str = "", *, stdout: bytes = b"", stderr: bytes = b"") -> None:
        p = self._proc(container_id, exec_id)
        if stdout:
            p.stdout.put_nowait(stdout)
        if stderr:
            p.stderr.put_nowait(stderr)

    def exit(self, container_id: str, exec_id: str = "", status: int = 0, *, stdout: bytes = b"",
             stderr: bytes = b"") -> None:
        """The process ends: optional last output, EOF on both streams, then ``status``."""
        p = self._proc(container_id, exec_id)
        self.output(container_id, exec_id, stdout=stdout, stderr=stderr)
        if not p.exit.done():
            p.stdout.put_nowait(b"")
            p.stderr.put_nowait(b"")
            p.exit.set_result(status)

    def oom(self, container_id: str) -> None:
        self._ooms.put_nowait(container_id)

    def lose_connection(self, reason: str = "connection closed by peer") -> None:
        self._lost_reason = reason
        lost = self._lost_future()
        if not lost.done():
            lost.set_result(None)
        self.connected = False

    @property
    def lost(self) -> bool:
        return self._lost is not None and self._lost.done()

    def _lost_future(self) -> asyncio.Future[None]:
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    # -- plumbing -----------------------------------------------------------------------------

    async def _enter(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        if self.lost:
            raise ConnectionClosed(f"{method}: {self._lost_reason}")
        hook = self.hooks.get(method)
        if hook is not None:
            result = hook()
            if inspect.isawaitable(result):
                await result
        exc = self.fail.get(method)
        if exc is not None:
            raise exc

    async def _block(self, method: str, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless the connection is lost first (then ConnectionClosed)."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        lost = self._lost_future()
        waiting: set[asyncio.Future[Any]] = {task, lost}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            raise ConnectionClosed(f"{method}: {self._lost_reason}")
        return task.result()

    # -- the facade ---------------------------------------------------------------------------

    async def connect(self, timeout: float, vm_gone: asyncio.Event) -> None:
        await self._enter("connect", timeout)
        if self.connect_hangs:
            try:
                await asyncio.wait_for(vm_gone.wait(), timeout)
            except TimeoutError:
                raise AgentError(f"guest agent not ready after {timeout:.0f}s: fake agent never answers") from None
            raise AgentError("the VM exited before its agent answered")
        if vm_gone.is_set():
            raise AgentError("the VM exited before its agent answered")
        self.connected = True

    async def close(self) -> None:
        self.calls.append(("close", ()))
        if not self.lost:
            self.lose_connection("client closed")

    async def create_sandbox(self, sandbox_id: str, *, hostname: str, storages: list[Any]) -> None:
        await self._enter("create_sandbox", sandbox_id, hostname, list(storages))
        self.sandbox = {"id": sandbox_id, "hostname": hostname, "storages": list(storages)}

    async def configure_network(self, interfaces: list[dict[str, Any]], routes: list[dict[str, Any]],
                                neighbors: list[dict[str, Any]]) -> None:
        await self._enter("configure_network", interfaces, routes, neighbors)
        self.network = (list(interfaces), list(routes), list(neighbors))

    async def set_vcpu_priorities(self, mapping: dict[str, list[int]]) -> None:
        await self._enter("set_vcpu_priorities", mapping)
        self.vcpu_priorities = {k: list(v) for k, v in mapping.items()}

    async def create_container(self, container_id: str, spec: dict[str, Any], *,
                               storages: list[dict[str, Any]] | None = None,
                               devices: list[dict[str, Any]] | None = None) -> None:
        await self._enter("create_container", container_id, spec)
        self.storages[container_id] = list(storages or [])
        self.devices[container_id] = list(devices or [])
        self.containers[container_id] = spec
        self.procs[(container_id, "")] = FakeProcess(container_id, "", dict(spec.get("process") or {}))

    async def start_container(self, container_id: str) -> None:
        await self._enter("start_container", container_id)
        self._proc(container_id, "").started = True

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> None:
        await self._enter("exec_process", container_id, exec_id, process)
        if container_id not in self.containers:
            raise NotFound(f"container {container_id} not found")
        self.procs[(container_id, exec_id)] = FakeProcess(container_id, exec_id, process, started=True)

    async def signal_process(self, container_id: str, exec_id: str, signal: int, all_processes: bool = False) -> None:
        await self._enter("signal_process", container_id, exec_id, signal, all_processes)
        p = self._proc(container_id, exec_id)
        p.signals.append(signal)
        if self.exit_on_signal and signal in _TERMINATING:
            self.exit(container_id, exec_id, 128 + signal)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        await self._enter("wait_process", container_id, exec_id)
        p = self._proc(container_id, exec_id)
        return await self._block("wait_process", asyncio.shield(p.exit))

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        await self._enter("read_stdout", container_id, exec_id, size)
        return await self._block("read_stdout", self._proc(container_id, exec_id).stdout.get())

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
        await self._enter("read_stderr", container_id, exec_id, size)
        return await self._block("read_stderr", self._proc(container_id, exec_id).stderr.get())

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        await self._enter("write_stdin", container_id, exec_id, data)
        self._proc(container_id, exec_id).stdin.extend(data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self._enter("close_stdin", container_id, exec_id)
        self._proc(container_id, exec_id).stdin_closed = True

    async def resize_tty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        await self._enter("resize_tty", container_id, exec_id, width, height)

    async def remove_container(self, container_id: str) -> None:
        await self._enter("remove_container", container_id)
        self.containers.pop(container_id, None)
        for key in [k for k in self.procs if k[0] == container_id]:
            self.procs.pop(key)

    async def pause_container(self, container_id: str) -> None:
        await self._enter("pause_container", container_id)

    async def resume_container(self, container_id: str) -> None:
        await self._enter("resume_container", container_id)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        await self._enter("update_container", container_id, resources)

    async def stats(self, container_id: str) -> Stats:
        await self._enter("stats", container_id)
        return self.stats_result

    async def next_oom(self) -> str:
        await self._enter("next_oom")
        return await self._block("next_oom", self._ooms.get())
