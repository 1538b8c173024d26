"""Host-side connections to the guest agent, each returning an asyncio (reader, writer).

Addresses:
  ``unix:///path``        virtio-serial: QEMU's chardev server socket for the agent port
  ``vsock://CID:PORT``    AF_VSOCK
  ``hvsock:///path:PORT`` hybrid vsock (Firecracker/Cloud Hypervisor): a Unix socket on which
                          ``CONNECT <port>\\n`` must be answered by a line starting ``OK``
Connecting retries until it succeeds or ``timeout`` passes (the VM may still be starting).
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.errors import AgentError, DeadlineExceeded, InvalidArgument

RETRY_INTERVAL = 0.05
STREAM_LIMIT = 2**20
HANDSHAKE_MAX = 256

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class AgentAddress:
    scheme: str  # "unix" | "vsock" | "hvsock"
    path: str = ""
    cid: int = 0
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme == "vsock":
            return f"vsock://{self.cid}:{self.port}"
        return f"hvsock://{self.path}:{self.port}"


def _port(text: str, addr: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise InvalidArgument(f"agent address {addr!r}: invalid port {text!r}") from None
    if not 0 < port < 2**32:
        raise InvalidArgument(f"agent address {addr!r}: port {port} out of range")
    return port


def parse_address(addr: str) -> AgentAddress:
    scheme, sep, rest = addr.partition("://")
    if not sep:
        raise InvalidArgument(f"agent address {addr!r} has no scheme")
    if scheme == "unix":
        if not rest.startswith("/") or len(rest) < 2:
            raise InvalidArgument(f"agent address {addr!r}: need an absolute socket path")
        return AgentAddress("unix", path=rest)
    if scheme == "vsock":
        cid_text, colon, port_text = rest.partition(":")
        if not colon:
            raise InvalidArgument(f"agent address {addr!r}: need vsock://CID:PORT")
        try:
            cid = int(cid_text)
        except ValueError:
            raise InvalidArgument(f"agent address {addr!r}: invalid cid {cid_text!r}") from None
        if not 0 <= cid < 2**32:
            raise InvalidArgument(f"agent address {addr!r}: cid out of range")
        return AgentAddress("vsock", cid=cid, port=_port(port_text, addr))
    if scheme == "hvsock":
        path, colon, port_text = rest.rpartition(":")
        if not colon or not path.startswith("/"):
            raise InvalidArgument(f"agent address {addr!r}: need hvsock:///path:PORT")
        return AgentAddress("hvsock", path=path, port=_port(port_text, addr))
    raise InvalidArgument(f"agent address {addr!r}: unknown scheme {scheme!r}")


async def _retry(what: str, attempt: Callable[[], Awaitable[Streams]], timeout: float) -> Streams:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Exception | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"connect {what}: timed out after {timeout}s ({last})")
        try:
            async with asyncio.timeout(remaining):
                return await attempt()
        except TimeoutError:
            raise DeadlineExceeded(f"connect {what}: timed out after {timeout}s ({last})") from None
        except (OSError, AgentError, asyncio.IncompleteReadError) as exc:
            last = exc
        await asyncio.sleep(min(RETRY_INTERVAL, max(0.0, deadline - loop.time())))


async def connect_unix(path: str, timeout: float) -> Streams:
    return await _retry(f"unix://{path}",
                        lambda: asyncio.open_unix_connection(path, limit=STREAM_LIMIT), timeout)


async def connect_vsock(cid: int, port: int, timeout: float) -> Streams:
    if not hasattr(socket, "AF_VSOCK"):
        raise AgentError("AF_VSOCK is not supported on this host")

    async def attempt() -> Streams:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
            return await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
        except BaseException:
            sock.close()
            raise

    return await _retry(f"vsock://{cid}:{port}", attempt, timeout)


async def hybrid_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    writer.write(f"CONNECT {port}\n".encode())
    await writer.drain()
    line = await reader.readuntil(b"\n")
    if len(line) > HANDSHAKE_MAX or not line.startswith(b"OK"):
        raise AgentError(f"hybrid vsock CONNECT {port} refused: {line[:80]!r}")


async def connect_hvsock(path: str, port: int, timeout: float) -> Streams:
    async def attempt() -> Streams:
        reader, writer = await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
        try:
            await hybrid_handshake(reader, writer, port)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    return await _retry(f"hvsock://{path}:{port}", attempt, timeout)


async def connect(address: str | AgentAddress, timeout: float = 30.0) -> Streams:
    addr = parse_address(address) if isinstance(address, str) else address
    if addr.scheme == "unix":
        return await connect_unix(addr.path, timeout)
    if addr.scheme == "vsock":
        return await connect_vsock(addr.cid, addr.port, timeout)
    return await connect_hvsock(addr.path, addr.port, timeout)
