"""ResourceManager: one lifecycle for every sandbox resource, with a write-ahead journal.

A resource (the 9p share, the pod network, the QoS cgroups; memory, devices and block volumes
next) implements :class:`Resource`. The manager runs, for each in order:

1. **record** — the resource's :meth:`Resource.record` is written to ``<state>/resources.json``
   *before* the resource acts, so ``delete`` after a ``kill -9`` at any moment finds it;
2. **before boot** — :meth:`Resource.before_boot` makes host objects and returns what the VM
   needs (a :class:`~hypervisor.base.VmPatch`: shares, NICs, disks, devices);
3. **after boot** — :meth:`Resource.after_boot` acts on the running VM and guest agent;
4. **teardown** — in reverse order; a failure is logged with the resource and surfaced
   (:class:`ResourceError` naming every resource that failed), never swallowed.

A resource that makes more host objects while it works calls ``ctx.persist()`` first, so the
journal always covers them. Resources attached to a running sandbox (a container's volume) use
:meth:`ResourceManager.attach`/:meth:`~ResourceManager.detach`. :func:`recover` undoes a journal
from a fresh process, newest entry first, through each kind's ``recover`` classmethod; the VM
itself is an entry of kind ``vm`` written by the sandbox before the VMM starts. Model: kata
runtime-rs ``ResourceManager`` (prepare_before_start_vm / setup_after_start_vm + persist).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from common.errors import KataColoError, ResourceError
from hypervisor.base import VmPatch

log = logging.getLogger(__name__)

JOURNAL = "resources.json"
JOURNAL_VERSION = 1
MAX_JOURNAL_BYTES = 4 << 20


@dataclass
class ResourceContext:
    """What resources see. Before boot: ids, paths, the configuration and the sandbox spec,
    the (unstarted) hypervisor. After boot also ``agent`` (a connected GuestAgent)."""

    sandbox_id: str
    state_dir: Path
    config: Any
    spec: Mapping[str, Any]
    hypervisor: Any
    vcpus: int = 1
    agent: Any = None
    persist: Callable[[], None] = lambda: None

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.spec.get("annotations") or {})


@runtime_checkable
class Resource(Protocol):
    kind: ClassVar[str]

    def record(self) -> dict[str, Any]:
        """JSON-able: enough for :meth:`recover` to undo whatever this resource may have made
        so far (and is about to make)."""

    async def before_boot(self, ctx: ResourceContext) -> VmPatch | None:
        """Make host objects; return what the VM needs (None = nothing)."""

    async def after_boot(self, ctx: ResourceContext) -> None:
        """Act on the running VM/guest (``ctx.agent`` is connected)."""

    async def teardown(self) -> None:
        """Undo everything (idempotent); raise on failure (the manager reports it)."""

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        """From a fresh process, undo what ``record`` describes (idempotent)."""


RecoverFn = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class _Entry:
    kind: str
    key: str
    resource: Resource | None = None
    fixed: dict[str, Any] | None = None  # a record that is not a live resource (the VM)

    def record(self) -> dict[str, Any]:
        if self.resource is not None:
            return self.resource.record()
        return dict(self.fixed or {})


def write_journal(path: Path, sandbox_id: str, entries: list[dict[str, Any]]) -> None:
    """Atomically replace the journal (temp file + rename in the same directory)."""
    data = json.dumps({"version": JOURNAL_VERSION, "sandbox_id": sandbox_id, "entries": entries},
                      sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=".resources.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's entries (oldest first); [] when there is none. A corrupt journal raises
    ResourceError (recovery cannot tell what to undo and must say so)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JOURNAL_BYTES + 1)
    except FileNotFoundError:
        return []
    if len(raw) > MAX_JOURNAL_BYTES:
        raise ResourceError(f"{path}: journal larger than {MAX_JOURNAL_BYTES} bytes")
    try:
        data = json.loads(raw)
        entries = data["entries"]
        if data.get("version") != JOURNAL_VERSION or not isinstance(entries, list):
            raise ValueError(f"unsupported version {data.get('version')!r}")
        return [{"kind": str(e["kind"]), "key": str(e.get("key", e["kind"])),
                 "record": dict(e.get("record") or {})} for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ResourceError(f"{path}: unreadable resource journal: {exc}") from None


@dataclass
class ResourceManager:
    """The resources of one sandbox, in creation order, journaled in ``state_dir``."""

    sandbox_id: str
    state_dir: Path
    _entries: list[_Entry] = field(default_factory=list)

    @property
    def journal_path(self) -> Path:
        return self.state_dir / JOURNAL

    def persist(self) -> None:
        """Rewrite the journal from every entry's current record."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_journal(self.journal_path, self.sandbox_id,
                      [{"kind": e.kind, "key": e.key, "record": e.record()} for e in self._entries])

    def resources(self) -> list[Resource]:
        return [e.resource for e in self._entries if e.resource is not None]

    def get(self, kind: str) -> Any:
        """The live resource of ``kind`` (first one), or None."""
        for e in self._entries:
            if e.kind == kind and e.resource is not None:
                return e.resource
        return None

    def _add(self, kind: str, key: str, resource: Resource | None, fixed: dict[str, Any] | None) -> _Entry:
        if any(e.key == key for e in self._entries):
            raise ResourceError(f"sandbox {self.sandbox_id}: resource {key} already present")
        entry = _Entry(kind, key, resource, fixed)
        self._entries.append(entry)
        self.persist()
        return entry

    def note(self, kind: str, record: dict[str, Any]) -> None:
        """Journal (or update) a record that is not a Resource (the VM: written before its VMM
        starts, updated once its pid is known)."""
        for e in self._entries:
            if e.key == kind and e.resource is None:
                e.fixed = dict(record)
                self.persist()
                return
        self._add(kind, kind, None, record)

    def forget(self, key: str) -> None:
        self._entries = [e for e in self._entries if e.key != key]
        self.persist()

    async def before_boot(self, resources: list[Resource], ctx: ResourceContext) -> list[VmPatch]:
        """Record then prepare each resource in order; the VM config patches, in order."""
        ctx.persist = self.persist
        patches: list[VmPatch] = []
        for r in resources:
            self._add(r.kind, r.kind, r, None)
            patch = await r.before_boot(ctx)
            self.persist()
            if patch is not None:
                patches.append(patch)
        return patches

    async def after_boot(self, ctx: ResourceContext) -> None:
        ctx.persist = self.persist
        for r in self.resources():
            await r.after_boot(ctx)
            self.persist()

    async def attach(self, resource: Resource, ctx: ResourceContext, key: str = "") -> None:
        """Add a resource to a running sandbox: record, then before- and after-boot at once.
        On failure it is torn down and forgotten (the error is re-raised)."""
        key = key or resource.kind
        ctx.persist = self.persist
        self._add(resource.kind, key, resource, None)
        try:
            await resource.before_boot(ctx)
            self.persist()
            await resource.after_boot(ctx)
            self.persist()
        except BaseException:
            try:
                await resource.teardown()
            except Exception as exc:  # noqa: BLE001 - the first error wins; this one is logged
                log.error("sandbox %s: %s teardown after a failed attach: %s", self.sandbox_id, key, exc)
                raise
            self.forget(key)
            raise

    async def detach(self, key: str) -> None:
        entry = next((e for e in self._entries if e.key == key), None)
        if entry is None:
            return
        if entry.resource is not None:
            await entry.resource.teardown()
        self.forget(key)

    async def teardown(self) -> None:
        """Tear every resource down, newest first. Entries that fail stay journaled (``delete``
        retries them); the error names each failed resource."""
        failures: list[str] = []
        for entry in reversed(list(self._entries)):
            if entry.resource is None:
                continue  # the VM: stopped by the sandbox before its resources
            try:
                await entry.resource.teardown()
            except Exception as exc:  # noqa: BLE001 - collected, logged and raised below
                log.error("sandbox %s: %s teardown failed: %s", self.sandbox_id, entry.key, exc,
                          exc_info=not isinstance(exc, KataColoError))
                failures.append(f"{entry.key}: {exc}")
                continue
            if entry in self._entries:
                self._entries.remove(entry)
            self.persist()
        self._entries = [e for e in self._entries if e.resource is not None]
        if failures:
            self.persist()
            raise ResourceError(f"sandbox {self.sandbox_id}: teardown failed: " + "; ".join(failures))
        _unlink_quietly(str(self.journal_path))


async def recover(state_dir: Path, kinds: Mapping[str, RecoverFn], timeout: float = 4.0) -> None:
    """Undo the journal in ``state_dir`` from a fresh process, newest entry first. Every entry is
    tried; the ones that fail stay in the journal and are named in the ResourceError raised."""
    path = state_dir / JOURNAL
    entries = read_journal(path)
    if not entries:
        _unlink_quietly(str(path))
        return
    sandbox_id = state_dir.name
    remaining: list[dict[str, Any]] = []
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for entry in reversed(entries):
        fn = kinds.get(entry["kind"])
        try:
            if fn is None:
                raise ResourceError(f"unknown resource kind {entry['kind']!r}")
            await asyncio.wait_for(fn(entry["record"]), max(0.1, deadline - loop.time()))
        except Exception as exc:  # noqa: BLE001 - collected, logged and raised below
            detail = str(exc) or type(exc).__name__  # a timeout has no message
            log.error("sandbox %s: recovering %s failed: %s", sandbox_id, entry["key"], detail,
                      exc_info=not isinstance(exc, (KataColoError, TimeoutError)))
            failures.append(f"{entry['key']}: {detail}")
            remaining.insert(0, entry)
    if remaining:
        write_journal(path, sandbox_id, remaining)
        raise ResourceError(f"sandbox {sandbox_id}: recovery incomplete: " + "; ".join(failures))
    _unlink_quietly(str(path))
