"""The ``cri_uid``/``cri_name``/``cri_namespace`` labels: CRI ListPodSandbox(state=READY) on the
runtime endpoint, matched by pod sandbox id (kata-monitor's syncSandboxes).

CRI only adds labels: membership comes from the filesystem. A lookup runs shortly after a new
sandbox appears and then every :data:`RETRY` seconds while some sandbox still lacks metadata, in
the background (a scrape never waits for CRI); until then, or when CRI is unreachable, the labels
are empty strings, as kata's are.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from common.errors import KataColoError
from cri.client import CriClient

log = logging.getLogger(__name__)

RETRY = 5.0
FIRST_DELAY = 0.2
TIMEOUT = 2.0
EMPTY = ("", "", "")


class CriLabels:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.meta: dict[str, tuple[str, str, str]] = {}
        self.errors = 0
        self.lookups = 0
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None

    def labels(self, sandbox_id: str) -> tuple[str, str, str]:
        """(uid, name, namespace) of a sandbox, or three empty strings."""
        return self.meta.get(sandbox_id, EMPTY)

    def want(self, ids: set[str], *, soon: bool = False) -> None:
        """Schedule a lookup when some of ``ids`` lack metadata (``soon``: a sandbox just appeared)."""
        if not self.endpoint or self._task is not None and not self._task.done():
            return
        missing = [i for i in ids if i not in self.meta]
        if not missing:
            return
        wait = FIRST_DELAY if soon else max(0.0, self._last + RETRY - time.monotonic())
        self._task = asyncio.get_running_loop().create_task(self._lookup_after(wait))

    async def _lookup_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.lookup()

    async def lookup(self) -> None:
        self._last = time.monotonic()
        self.lookups += 1
        try:
            async with CriClient(self.endpoint, timeout=TIMEOUT) as client:
                pods = await client.list_pod_sandbox(ready=True)
        except (KataColoError, OSError, TimeoutError) as exc:
            self.errors += 1
            log.debug("CRI ListPodSandbox on %s: %s", self.endpoint, exc)
            return
        for pod in pods:
            md = pod.metadata
            self.meta[pod.id] = (md.uid, md.name, md.namespace)

    def forget(self, sandbox_id: str) -> None:
        self.meta.pop(sandbox_id, None)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
