"""Client side of the shims' management sockets (used by ``kata-colo-ctl`` and
``kata-colo-monitor``): sandbox discovery under the state root, unique-prefix resolution (as
kata-ctl's get_uds_with_sid), and HTTP over the Unix socket with aiohttp's UnixConnector.

Errors are :mod:`common.errors` classes: NotFound (no such sandbox), InvalidArgument (ambiguous
prefix), Unavailable (the socket is missing or nobody answers: the shim is dead), DeadlineExceeded,
and :class:`ShimError` for an HTTP error answer (its ``status`` and the server's reason).
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp

from common.errors import DeadlineExceeded, InvalidArgument, KataColoError, NotFound, Unavailable
from common.ids import valid_id
from shim.mgmt.server import SOCKET_NAME
from shim.persist import STATE_ROOT

DEFAULT_TIMEOUT = 3.0  # kata's shim client / monitor timeout


class ShimError(KataColoError):
    """The shim answered with an HTTP error."""

    def __init__(self, status: int, reason: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{reason} (HTTP {status})")
        self.status = status
        self.reason = reason
        self.body = body  # the JSON error document (with extra fields, e.g. memory limits)


def list_sandboxes(root: str | os.PathLike[str] = STATE_ROOT) -> list[str]:
    """Sandbox ids: the directories under ``root`` (sorted; none when it does not exist)."""
    try:
        entries = os.scandir(root)
    except FileNotFoundError:
        return []
    with entries:
        return sorted(e.name for e in entries if valid_id(e.name) and e.is_dir(follow_symlinks=False))


def resolve(prefix: str, root: str | os.PathLike[str] = STATE_ROOT) -> str:
    """The one sandbox id starting with ``prefix`` (an exact id always wins)."""
    if not prefix:
        raise InvalidArgument("empty sandbox id")
    ids = list_sandboxes(root)
    if prefix in ids:
        return prefix
    hits = [i for i in ids if i.startswith(prefix)]
    if not hits:
        raise NotFound(f"no sandbox matches {prefix!r} under {root}")
    if len(hits) > 1:
        shown = ", ".join(h[:16] for h in hits[:5]) + (", ..." if len(hits) > 5 else "")
        raise InvalidArgument(f"sandbox id prefix {prefix!r} is ambiguous: {len(hits)} match ({shown})")
    return hits[0]


def socket_of(sandbox_id: str, root: str | os.PathLike[str] = STATE_ROOT) -> str:
    return str(Path(root) / sandbox_id / SOCKET_NAME)


class ShimClient:
    """HTTP to one shim's management socket. Use as ``async with ShimClient(path) as c``."""

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT, sandbox_id: str = "") -> None:
        self.path = path
        self.sandbox_id = sandbox_id or Path(path).parent.name
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ShimClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.path),
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(self, method: str, path: str, *, body: Any = None,
                      headers: dict[str, str] | None = None, timeout: float | None = None) -> tuple[bytes, str]:
        """(body, content type) of a 2xx answer; raises as the module docstring says."""
        if not os.path.exists(self.path):
            raise Unavailable(f"sandbox {self.sandbox_id}: no management socket {self.path} (shim gone?)")
        data = None if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            async with self._client().request(
                    method, f"http://shim{path}", data=data, headers=hdrs,
                    timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise ShimError(resp.status, _reason(raw, resp.reason or ""), _error_doc(raw))
                return raw, resp.headers.get("Content-Type", "")
        except TimeoutError:
            raise DeadlineExceeded(f"sandbox {self.sandbox_id}: no answer within "
                                   f"{timeout or self.timeout:.0f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"sandbox {self.sandbox_id}: its shim does not answer on {self.path} "
                              f"(dead?): {exc}") from None

    async def get_text(self, path: str, **kw: Any) -> str:
        raw, _ = await self.request("GET", path, **kw)
        return raw.decode(errors="replace")

    async def json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        raw, _ = await self.request(method, path, body=body, **kw)
        try:
            return json.loads(raw)
        except ValueError:
            raise Unavailable(f"sandbox {self.sandbox_id}: not JSON: {raw[:80]!r}") from None


def _error_doc(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _reason(raw: bytes, fallback: str) -> str:
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"]
    except ValueError:
        pass
    return raw.decode(errors="replace").strip()[:300] or fallback


async def gather_json(ids: list[str], path: str, root: str | os.PathLike[str] = STATE_ROOT,
                      timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """GET ``path`` of every sandbox in parallel: {id: document or the KataColoError}."""
    async def one(sid: str) -> Any:
        async with ShimClient(socket_of(sid, root), timeout=timeout, sandbox_id=sid) as c:
            try:
                return await c.json("GET", path)
            except KataColoError as exc:
                return exc
    results = await asyncio.gather(*(one(s) for s in ids))
    return dict(zip(ids, results))
