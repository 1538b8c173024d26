"""TEST-ONLY sandbox resources (the :class:`shim.resources.manager.Resource` protocol) that make
a real but harmless host object: a file ``<state>/<kind>.obj``. So a test sees exactly what was
made and what was released, without root.

* :func:`resource_class` builds a class per kind with its own behaviour: ``fail`` maps a phase
  (``for_sandbox``, ``before_boot``, ``after_boot``, ``teardown``, ``recover``) to the exception
  raised there; ``hooks`` maps a phase to a callable run first (given the instance, or the record
  for ``recover``; async phases await what it returns) — e.g. to read the journal at the moment
  the resource acts. The class keeps
  its ``instances``, the ``events`` of all of them (``(kind, phase)``, in order, shared with
  every class made by the same :class:`Recorder`) and the records it ``recovered``.
* ``before_boot`` makes the file and returns a VmPatch with one kernel parameter
  ``fake.<kind>=1`` (so a test can see the patches reach the VM config); ``teardown`` and
  ``recover`` remove it.
* :class:`FakeShareFs` is kind ``sharefs`` with a share that only records binds (ContainerOps
  needs one for every container); no mounts, so no root.

Install with ``monkeypatch.setattr(shim.resources, "SANDBOX_RESOURCES", (A, B, ...))``.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from common.errors import InvalidArgument
from hypervisor.base import VmPatch
from shim.resources.manager import ResourceContext


@dataclass
class Recorder:
    """Events of every fake resource made with it, in order: ``(kind, phase)``."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def phases(self, phase: str) -> list[str]:
        return [kind for kind, p in self.events if p == phase]


class FakeResource:
    kind: ClassVar[str] = "fake"
    fail: ClassVar[dict[str, BaseException]] = {}
    hooks: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    recorder: ClassVar[Recorder]
    instances: ClassVar[list[FakeResource]]
    recovered: ClassVar[list[dict[str, Any]]]

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / f"{self.kind}.obj"
        self.ctx_seen: list[ResourceContext] = []
        type(self).instances.append(self)

    @classmethod
    def _phase(cls, phase: str, arg: Any) -> Any:
        """Record, run the hook (its result is returned: an awaitable for async phases), and
        raise the injected failure only after an async hook ran (see :meth:`_aphase`)."""
        cls.recorder.events.append((cls.kind, phase))
        hook = cls.hooks.get(phase)
        result = hook(arg) if hook is not None else None
        if not inspect.isawaitable(result):
            cls._raise(phase)
        return result

    @classmethod
    def _raise(cls, phase: str) -> None:
        exc = cls.fail.get(phase)
        if exc is not None:
            raise exc

    @classmethod
    async def _aphase(cls, phase: str, arg: Any) -> None:
        result = cls._phase(phase, arg)
        if inspect.isawaitable(result):
            await result
            cls._raise(phase)

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> FakeResource | None:
        cls._phase("for_sandbox", ctx)
        return cls(ctx.state_dir)

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    async def before_boot(self, ctx: ResourceContext) -> VmPatch | None:
        self.ctx_seen.append(ctx)
        await self._aphase("before_boot", self)
        self.path.write_text(self.kind)
        return VmPatch(kernel_params=(f"fake.{self.kind}=1",))

    async def after_boot(self, ctx: ResourceContext) -> None:
        self.ctx_seen.append(ctx)
        await self._aphase("after_boot", self)

    async def teardown(self) -> None:
        await self._aphase("teardown", self)
        self.path.unlink(missing_ok=True)

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        cls.recovered.append(dict(record))
        await cls._aphase("recover", record)
        path = str(record.get("path") or "")
        if path:
            Path(path).unlink(missing_ok=True)


def resource_class(kind: str, recorder: Recorder, *, fail: dict[str, BaseException] | None = None,
                   hooks: dict[str, Callable[[Any], Any]] | None = None,
                   base: type[FakeResource] = FakeResource) -> type[FakeResource]:
    """A FakeResource class of ``kind`` with its own failures, hooks and bookkeeping."""
    attrs = {"kind": kind, "fail": dict(fail or {}), "hooks": dict(hooks or {}), "recorder": recorder,
             "instances": [], "recovered": []}
    return type(f"Fake_{kind}", (base,), attrs)


class FakeShare:
    """The part of :class:`~shim.resources.sharefs.Virtio9pShare` ContainerOps uses, recording
    what would be bound (``binds``: share name → (source, read-only))."""

    tag = "kataShared"

    def __init__(self, host_dir: Path) -> None:
        self.host_dir = host_dir
        self.binds: dict[str, tuple[str, bool]] = {}
        self.unshared: list[str] = []

    def share_rootfs(self, container_id: str, host_rootfs: Path, readonly: bool = False) -> str:
        self.binds[f"{container_id}/rootfs"] = (str(host_rootfs), readonly)
        return f"/run/kata-containers/shared/containers/{container_id}/rootfs"

    def share_path(self, source: str, name: str, readonly: bool = False) -> str:
        if not os.path.isabs(source):
            raise InvalidArgument(f"share source {source!r} is not absolute")
        self.binds[name] = (source, readonly)
        return f"/run/kata-containers/shared/containers/{name}"

    def unshare_path(self, name: str) -> None:
        self.binds.pop(name, None)
        self.unshared.append(name)

    def unshare(self, container_id: str) -> None:
        self.binds.pop(f"{container_id}/rootfs", None)
        self.unshared.append(container_id)


class FakeShareFs(FakeResource):
    """Kind ``sharefs`` whose ``share`` is a :class:`FakeShare`."""

    kind: ClassVar[str] = "sharefs"

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.share = FakeShare(state_dir / "shared")

    def guest_storages(self) -> list[Any]:
        return [f"9p:{self.share.tag}"]
