"""Who may use a shim's management socket: root, or a member of ``[runtime] admin_gid``.

The check is made per request from the connection's SO_PEERCRED (pid, uid, gid), the
credentials the kernel recorded at connect() — not from anything the client sends. A peer is an
admin when its uid is 0, or when ``admin_gid`` is not 0 and it is the peer's primary gid or one
of its supplementary groups (``Groups:`` of /proc/<pid>/status). Everyone else gets 403.

This stands behind the file permissions, which already keep others out: the socket is 0600
root-owned, or 0660 with group ``admin_gid`` (and its sandbox directory 0710 with that group)
when one is configured (:func:`open_access`).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ttrpc.unix import peer_credentials

Peer = tuple[int, int, int]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def supplementary_groups(pid: int, proc: str = "/proc") -> set[int]:
    try:
        text = Path(f"{proc}/{pid}/status").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:] if g.isdigit()}
    return set()


def is_admin(peer: Peer | None, admin_gid: int, proc: str = "/proc") -> bool:
    if peer is None:
        return False
    pid, uid, gid = peer
    if uid == 0:
        return True
    if admin_gid <= 0:
        return False
    return gid == admin_gid or admin_gid in supplementary_groups(pid, proc)


def request_peer(request: web.Request) -> Peer | None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None  # asyncio TransportSocket
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    return peer_credentials(sock)


def middleware(admin_gid: int) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request_peer(request)
        if not is_admin(peer, admin_gid):
            who = f"uid {peer[1]} gid {peer[2]}" if peer else "an unknown peer"
            allowed = f"root or gid {admin_gid}" if admin_gid > 0 else "root"
            raise web.HTTPForbidden(reason=f"{who} may not use this socket (allowed: {allowed})")
        return await handler(request)

    return check_peer


def open_access(socket_path: str, admin_gid: int) -> None:
    """With an admin group: socket 0660 and its directory 0710, both group ``admin_gid``
    (root only otherwise: the socket stays 0600, the directory untouched)."""
    if admin_gid <= 0:
        return
    directory = os.path.dirname(socket_path)
    os.chown(directory, -1, admin_gid)
    os.chmod(directory, 0o710)
    os.chown(socket_path, -1, admin_gid)
    os.chmod(socket_path, 0o660)
