"""Which sandboxes exist: the directories under the state root, kept current with inotify.

The filesystem is the source of truth (as kata-monitor since kata-containers#3553): a directory
``<root>/<id>`` created is a sandbox at once (no polling delay: scraped by the very next scrape),
a directory removed is gone. When the root does not exist yet (no sandbox ever ran on this boot)
its nearest existing ancestor is watched and the root is picked up the moment it is made, not
60 s later as kata-monitor's retry does (kata-containers#3705). A full re-listing every
:data:`RESYNC` seconds covers an inotify queue overflow.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Inotify, Mask

from common.ids import valid_id
from shim.mgmt.client import list_sandboxes

log = logging.getLogger(__name__)

RESYNC = 5.0
ROOT_MASK = (Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.ONLYDIR
             | Mask.DELETE_SELF | Mask.MOVE_SELF)
ANCESTOR_MASK = Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR | Mask.DELETE_SELF | Mask.MOVE_SELF


class SandboxWatcher:
    """``ids``: the sandbox ids now. ``on_change(added, removed)`` is called for every change."""

    def __init__(self, root: str, on_change: Callable[[set[str], set[str]], None] | None = None) -> None:
        self.root = Path(root)
        self.ids: set[str] = set()
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def resync(self) -> None:
        now = set(list_sandboxes(self.root))
        added, removed = now - self.ids, self.ids - now
        self.ids = now
        if (added or removed) and self.on_change is not None:
            self.on_change(added, removed)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sandbox-watcher")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _nearest_existing(self) -> Path:
        p = self.root
        while not p.is_dir() and p != p.parent:
            p = p.parent
        return p

    async def _run(self) -> None:
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep discovering whatever happened
                log.exception("sandbox watcher failed; retrying")
                await asyncio.sleep(1.0)

    async def _watch_once(self) -> None:
        with Inotify() as inotify:
            target = self._nearest_existing()
            watching_root = target == self.root
            inotify.add_watch(target, ROOT_MASK if watching_root else ANCESTOR_MASK)
            self.resync()  # after the watch exists: nothing created in between is missed
            self.ready.set()
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + RESYNC
            events = inotify.__aiter__()
            while True:
                try:
                    event = await asyncio.wait_for(events.__anext__(), max(0.0, next_resync - loop.time()))
                except TimeoutError:
                    self.resync()
                    next_resync = loop.time() + RESYNC
                    continue
                if event.mask & (Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED | Mask.Q_OVERFLOW):
                    self.resync()
                    return  # re-establish the watch (root removed, or events lost)
                if not watching_root:
                    # something appeared on the way to the root: re-watch from closer
                    if event.name is not None and self._on_path(target / event.name):
                        return
                    continue
                if event.name is not None:
                    self._apply(event.mask, str(event.name))

    def _on_path(self, created: Path) -> bool:
        return self.root == created or created in self.root.parents

    def _apply(self, mask: Mask, name: str) -> None:
        if mask & (Mask.CREATE | Mask.MOVED_TO):
            if name not in self.ids and valid_id(name) and (self.root / name).is_dir():
                self.ids.add(name)
                if self.on_change is not None:
                    self.on_change({name}, set())
        elif mask & (Mask.DELETE | Mask.MOVED_FROM) and name in self.ids:
            self.ids.discard(name)
            if self.on_change is not None:
                self.on_change(set(), {name})
