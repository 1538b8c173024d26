"""Client of Cloud Hypervisor's REST API on its Unix socket (``--api-socket path=...``).

The API is the one CH's ``vmm/src/api/openapi/cloud-hypervisor.yaml`` defines (info.version
0.3.0, server ``http://localhost/api/v1``): GET for ``vmm.ping``/``vm.info``/``vm.counters``,
PUT for every action, JSON bodies, 200 with a body or 204 without one.

Contract:

* HTTP/1.1 is spoken by ``h11`` over one fresh ``AF_UNIX`` connection per request, and only one
  request is in flight at a time (an ``asyncio.Lock``: CH's API thread serves requests one by
  one, and a second request must not interleave with a hot-plug).
* File descriptors (the tap fds of ``vm.add-net``) travel as ``SCM_RIGHTS`` ancillary data with
  the first bytes of the request on the same socket, as kata's clh.go does; CH pairs them with the
  request it reads them with. The caller keeps ownership of its fds.
* Every call has a deadline (:data:`TIMEOUTS`, kata's values: ``clhAPITimeout`` 1 s,
  ``clhHotPlugAPITimeout`` 5 s, create+boot 10 s, stop 3 s); a VMM that does not answer in time
  raises DeadlineExceeded.
* A non-2xx answer raises the :mod:`common.errors` class of its status (:data:`STATUS_ERRORS`,
  each with ``status``) carrying CH's own message (its JSON list of error-chain strings, joined).
  ``vm.resize`` answered 429 ("cpu removal still pending") is retried :data:`RESIZE_RETRIES`
  times, :data:`RESIZE_RETRY_DELAY` apart, as kata does.
* A socket that cannot be reached, or that closes or resets before a complete answer, raises
  :class:`common.errors.ConnectionClosed`; the driver turns that into "the VMM died" when its
  process is gone (this module knows no process).
* Answers larger than :data:`MAX_RESPONSE_BYTES` or that are not JSON where JSON is due raise
  HypervisorError.
"""
from __future__ import annotations

import array
import asyncio
import json
import socket
from collections.abc import Sequence
from typing import Any

import h11

from common.errors import (
    AlreadyExists,
    ConnectionClosed,
    DeadlineExceeded,
    FailedPrecondition,
    HypervisorError,
    InvalidArgument,
    KataColoError,
    NotFound,
    ResourceExhausted,
)

API_PREFIX = "/api/v1/"
API_TIMEOUT = 1.0            # kata clhAPITimeout
HOTPLUG_TIMEOUT = 5.0        # kata clhHotPlugAPITimeout (add-disk, add-device, remove-device)
CREATE_BOOT_TIMEOUT = 10.0   # kata clhCreateAndBootVMMinimumTimeout
STOP_TIMEOUT = 3.0           # kata clhStopSandboxTimeout
SNAPSHOT_TIMEOUT = 60.0      # ours: guest memory is written to (or read from) disk
RESIZE_RETRIES = 20          # kata: vm.resize "Too Many Requests" retried 20 x 20 ms
RESIZE_RETRY_DELAY = 0.02
MAX_RESPONSE_BYTES = 4 << 20
MAX_FDS = 64
MESSAGE_LIMIT = 2000

TIMEOUTS: dict[str, float] = {
    "vmm.ping": API_TIMEOUT,
    "vmm.shutdown": STOP_TIMEOUT,
    "vm.info": API_TIMEOUT,
    "vm.counters": API_TIMEOUT,
    "vm.create": CREATE_BOOT_TIMEOUT,
    "vm.boot": CREATE_BOOT_TIMEOUT,
    "vm.pause": HOTPLUG_TIMEOUT,    # kata never pauses a CH VM; ours
    "vm.resume": HOTPLUG_TIMEOUT,
    "vm.shutdown": STOP_TIMEOUT,
    "vm.delete": STOP_TIMEOUT,
    "vm.resize": API_TIMEOUT,
    "vm.add-net": HOTPLUG_TIMEOUT,
    "vm.add-disk": HOTPLUG_TIMEOUT,
    "vm.add-device": HOTPLUG_TIMEOUT,
    "vm.remove-device": HOTPLUG_TIMEOUT,
    "vm.snapshot": SNAPSHOT_TIMEOUT,
    "vm.restore": SNAPSHOT_TIMEOUT,
}
GET_ENDPOINTS = frozenset({"vmm.ping", "vm.info", "vm.counters"})


class ClhBadRequest(InvalidArgument):
    status = 400


class ClhNotFound(NotFound):
    status = 404


class ClhWrongState(FailedPrecondition):
    status = 405


class ClhConflict(AlreadyExists):
    status = 409


class ClhTooManyRequests(ResourceExhausted):
    status = 429


class ClhServerError(HypervisorError):
    status = 500


STATUS_ERRORS: dict[int, type[KataColoError]] = {
    400: ClhBadRequest, 404: ClhNotFound, 405: ClhWrongState, 409: ClhConflict,
    429: ClhTooManyRequests, 500: ClhServerError,
}


def ch_message(body: bytes) -> str:
    """CH's error text: its JSON list of error-chain messages joined, else the body as text."""
    text = body[:MESSAGE_LIMIT * 2].decode(errors="replace").strip()
    try:
        chain = json.loads(text)
    except ValueError:
        chain = None
    if isinstance(chain, list) and all(isinstance(m, str) for m in chain):
        text = ": ".join(chain)
    elif isinstance(chain, str):
        text = chain
    return text[:MESSAGE_LIMIT]


def status_error(endpoint: str, status: int, reason: str, body: bytes) -> KataColoError:
    cls = STATUS_ERRORS.get(status, HypervisorError)
    detail = ch_message(body)
    message = f"cloud-hypervisor {endpoint}: HTTP {status} {reason}" + (f": {detail}" if detail else "")
    return cls(message)


class ClhApi:
    """One VMM's API socket. Methods are the endpoints the driver uses."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._lock = asyncio.Lock()

    # -- transport ------------------------------------------------------------------------

    async def call(self, endpoint: str, body: dict[str, Any] | None = None, *,
                   fds: Sequence[int] = (), timeout: float | None = None) -> Any:
        """One request; returns the decoded JSON answer (None for an empty one)."""
        if endpoint not in TIMEOUTS:
            raise InvalidArgument(f"unknown cloud-hypervisor endpoint {endpoint!r}")
        if len(fds) > MAX_FDS:
            raise InvalidArgument(f"{endpoint}: too many fds ({len(fds)} > {MAX_FDS})")
        method = "GET" if endpoint in GET_ENDPOINTS else "PUT"
        payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        limit = TIMEOUTS[endpoint] if timeout is None else timeout
        async with self._lock:
            try:
                async with asyncio.timeout(limit):
                    status, reason, data = await self._exchange(method, API_PREFIX + endpoint, payload, fds)
            except TimeoutError:
                raise DeadlineExceeded(f"cloud-hypervisor {endpoint} did not answer within {limit:g}s") from None
        if not 200 <= status < 300:
            raise status_error(endpoint, status, reason, data)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise HypervisorError(f"cloud-hypervisor {endpoint}: answer is not JSON: {data[:200]!r}") from None

    async def _exchange(self, method: str, target: str, payload: bytes,
                        fds: Sequence[int]) -> tuple[int, str, bytes]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            try:
                await loop.sock_connect(sock, self.socket_path)
            except OSError as exc:
                raise ConnectionClosed(f"cannot connect to the cloud-hypervisor API socket "
                                       f"{self.socket_path}: {exc.strerror or exc}") from None
            conn = h11.Connection(our_role=h11.CLIENT)
            headers = [("Host", "localhost"), ("Accept", "application/json")]
            if method == "PUT":
                headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
            data = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
            if payload:
                data += conn.send(h11.Data(data=payload)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            try:
                if fds:
                    data = data[await self._sendmsg(loop, sock, data, fds):]
                if data:
                    await loop.sock_sendall(sock, data)
                return await self._receive(loop, sock, conn, target)
            except OSError as exc:
                raise ConnectionClosed(f"cloud-hypervisor API connection broke during {target}: "
                                       f"{exc.strerror or exc}") from None
        finally:
            sock.close()

    @staticmethod
    async def _sendmsg(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes,
                       fds: Sequence[int]) -> int:
        """Send the first bytes of ``data`` with ``fds`` as SCM_RIGHTS; returns bytes sent."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            try:
                return sock.sendmsg([data], ancillary)
            except (BlockingIOError, InterruptedError):
                await _writable(loop, sock)

    @staticmethod
    async def _receive(loop: asyncio.AbstractEventLoop, sock: socket.socket, conn: h11.Connection,
                       target: str) -> tuple[int, str, bytes]:
        status, reason, size = 0, "", 0
        chunks: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if not status:
                    raise ConnectionClosed(f"cloud-hypervisor closed the API connection without answering "
                                           f"{target}") from None
                raise ConnectionClosed(f"cloud-hypervisor API answer to {target} broken off: {exc}") from None
            if event is h11.NEED_DATA:
                conn.receive_data(await loop.sock_recv(sock, 65536))
            elif isinstance(event, h11.Response):
                status, reason = event.status_code, event.reason.decode(errors="replace")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise HypervisorError(f"cloud-hypervisor answer to {target} exceeds {MAX_RESPONSE_BYTES} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, reason, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionClosed(f"cloud-hypervisor closed the API connection without answering {target}")
            # h11.InformationalResponse (1xx): keep reading

    # -- endpoints --------------------------------------------------------------------------

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return _object(await self.call("vmm.ping", timeout=timeout), "vmm.ping")

    async def info(self) -> dict[str, Any]:
        return _object(await self.call("vm.info"), "vm.info")

    async def counters(self) -> dict[str, Any]:
        return _object(await self.call("vm.counters"), "vm.counters")

    async def create(self, vm_config: dict[str, Any], timeout: float | None = None) -> None:
        await self.call("vm.create", vm_config, timeout=timeout)

    async def boot(self, timeout: float | None = None) -> None:
        await self.call("vm.boot", timeout=timeout)

    async def pause(self) -> None:
        await self.call("vm.pause")

    async def resume(self) -> None:
        await self.call("vm.resume")

    async def shutdown(self) -> None:
        await self.call("vm.shutdown")

    async def delete(self) -> None:
        await self.call("vm.delete")

    async def shutdown_vmm(self, timeout: float | None = None) -> None:
        await self.call("vmm.shutdown", timeout=timeout)

    async def add_net(self, net_config: dict[str, Any], fds: Sequence[int]) -> dict[str, Any] | None:
        return _device_info(await self.call("vm.add-net", net_config, fds=fds), "vm.add-net")

    async def add_disk(self, disk_config: dict[str, Any]) -> dict[str, Any] | None:
        return _device_info(await self.call("vm.add-disk", disk_config), "vm.add-disk")

    async def add_device(self, device_config: dict[str, Any]) -> dict[str, Any] | None:
        return _device_info(await self.call("vm.add-device", device_config), "vm.add-device")

    async def remove_device(self, dev_id: str) -> None:
        await self.call("vm.remove-device", {"id": dev_id})

    async def resize(self, *, desired_vcpus: int | None = None, desired_ram: int | None = None,
                     desired_balloon: int | None = None) -> None:
        """``vm.resize``; ``desired_balloon`` is the amount the balloon REMOVES from the guest.
        429 (a vCPU removal still pending) is retried as kata does."""
        body: dict[str, Any] = {}
        for key, value in (("desired_vcpus", desired_vcpus), ("desired_ram", desired_ram),
                           ("desired_balloon", desired_balloon)):
            if value is not None:
                body[key] = value
        if not body:
            raise InvalidArgument("vm.resize needs desired_vcpus, desired_ram or desired_balloon")
        for attempt in range(RESIZE_RETRIES + 1):
            try:
                await self.call("vm.resize", body)
                return
            except ClhTooManyRequests:
                if attempt == RESIZE_RETRIES:
                    raise
                await asyncio.sleep(RESIZE_RETRY_DELAY)

    async def snapshot(self, destination_url: str) -> None:
        await self.call("vm.snapshot", {"destination_url": destination_url})

    async def restore(self, source_url: str, resume: bool) -> None:
        await self.call("vm.restore", {"source_url": source_url, "resume": resume})


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


def _object(value: Any, endpoint: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HypervisorError(f"cloud-hypervisor {endpoint}: expected a JSON object, got {type(value).__name__}")
    return value


def _device_info(value: Any, endpoint: str) -> dict[str, Any] | None:
    """``PciDeviceInfo`` of a 200 answer (None for 204, a cold-plug before boot)."""
    if value is None:
        return None
    info = _object(value, endpoint)
    if not isinstance(info.get("id"), str) or not isinstance(info.get("bdf"), str):
        raise HypervisorError(f"cloud-hypervisor {endpoint}: PciDeviceInfo needs string id and bdf: {info!r}")
    return info
