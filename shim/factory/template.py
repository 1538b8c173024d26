"""The VM template on disk (kata's factory/template): one booted VM's RAM and device state.

Layout of ``[factory] template_path`` (default ``/run/kata-colo/vm/template``), a tmpfs of
``default_memory + 8 MiB`` mounted ``nosuid,nodev,mode=0700`` there::

    memory          the template VM's RAM (the memory-backend-file, shared while it ran)
    state           its device state (QMP migrate with x-ignore-shared: RAM is not in it)
    template.json   written last, atomically: the VM shape and key (:mod:`shim.factory.key`),
                    sizes of both files and the sha256 of ``state``
    build.json      only while a template is being built: the template VM's driver record,
                    written before its VMM starts (a build killed at any moment is undone by
                    the next build or ``destroy`` from this record alone)

:meth:`Template.build` boots the VM with no pod resources (the 9p device is there, exporting a
directory of the template VM's own: QEMU cannot migrate while a 9p export is mounted, so the
share is unmounted again before the save; each clone exports its own sandbox's directory on its
own command line), lets the ready step warm it (:mod:`shim.factory.warmup`), pauses, saves,
stops it. Concurrent builders and cloners serialise on an flock of
``<template_path>.lock``; a clone holds it shared only while it checks the files. ``destroy``
lazily unmounts the tmpfs: running clones keep their mapping of the old memory file (the tmpfs
lives until the last of them exits), new ones cannot find it.

:meth:`Template.check` returns the template or raises :class:`TemplateUnusable` for one that is
truncated (sizes or the state's sha256 differ from template.json), of another format, or
half-built.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.errors import FailedPrecondition, KataColoError, ResourceError
from common.mount import MS_NODEV, MS_NOSUID, is_mountpoint, mount, umount
from hypervisor import registry
from hypervisor.base import Hypervisor, SharedDir, Snapshot, VmConfig
from shim.factory import key as keymod
from shim.factory import vmdir

log = logging.getLogger(__name__)

MEMORY = "memory"
STATE = "state"
META = "template.json"
BUILD = "build.json"
DEVICE_STATE_MIB = 8          # kata's templateDeviceStateSize on amd64
LOCK_TIMEOUT = 180.0
MAX_META_BYTES = 1 << 20

#: ready(hv, cfg, timeout): the freshly booted template VM is ready to be saved
#: (:func:`shim.factory.warmup.prepare_template`)
AgentReady = Callable[[Hypervisor, VmConfig, float], Awaitable[None]]


class TemplateUnusable(KataColoError):
    """The template exists but must not be cloned (truncated, foreign, half-built)."""


@dataclass(frozen=True)
class TemplateInfo:
    path: Path
    key: str
    shape: dict[str, Any]
    memory_bytes: int
    state_bytes: int
    state_sha256: str
    created: float
    build_seconds: float

    @property
    def memory_file(self) -> str:
        return str(self.path / MEMORY)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "shape": self.shape, "memory_bytes": self.memory_bytes,
                "state_bytes": self.state_bytes, "state_sha256": self.state_sha256,
                "created": self.created, "build_seconds": self.build_seconds}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_META_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_META_BYTES:
        raise TemplateUnusable(f"{path} is larger than {MAX_META_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise TemplateUnusable(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TemplateUnusable(f"{path} is not a JSON object")
    return data


class Template:
    """The template at one path. Blocking methods (files, mounts, flock): call them in a thread;
    :meth:`build` is async and does that itself."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_absolute() or self.path == Path("/"):
            raise FailedPrecondition(f"template_path must be an absolute directory, not {self.path}")

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    @contextlib.contextmanager
    def locked(self, exclusive: bool, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ResourceError(f"template {self.path} stays locked (a build running "
                                            f"for over {timeout:.0f}s?)") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # -- reading ------------------------------------------------------------------------------

    def check(self) -> TemplateInfo | None:
        """The usable template, None when there is none; TemplateUnusable otherwise."""
        meta = _read_json(self.path / META)
        if meta is None:
            if (self.path / BUILD).exists():
                raise TemplateUnusable(f"template {self.path} is half-built (build.json without template.json)")
            return None
        try:
            info = TemplateInfo(self.path, str(meta["key"]), dict(meta["shape"]), int(meta["memory_bytes"]),
                                int(meta["state_bytes"]), str(meta["state_sha256"]), float(meta["created"]),
                                float(meta.get("build_seconds", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateUnusable(f"{self.path / META}: {exc!r} missing or malformed") from None
        if info.shape.get("format") != keymod.FORMAT:
            raise TemplateUnusable(f"template {self.path} has format {info.shape.get('format')!r} "
                                   f"(this kata-colo writes {keymod.FORMAT})")
        for name, want in ((MEMORY, info.memory_bytes), (STATE, info.state_bytes)):
            try:
                size = (self.path / name).stat().st_size
            except FileNotFoundError:
                raise TemplateUnusable(f"template {self.path}: {name} is missing") from None
            if size != want:
                raise TemplateUnusable(f"template {self.path}: {name} is {size} bytes, "
                                       f"template.json says {want} (truncated?)")
        if _sha256(self.path / STATE) != info.state_sha256:
            raise TemplateUnusable(f"template {self.path}: state does not match its sha256")
        return info

    def status(self) -> dict[str, Any]:
        """For ``factory status``: mounted, usable or why not, the template's metadata and the
        QEMU processes that still map its memory file (running clones)."""
        out: dict[str, Any] = {"path": str(self.path), "mounted": is_mountpoint(self.path)}
        try:
            info = self.check()
            out["template"] = info.to_json() if info else None
        except TemplateUnusable as exc:
            out["template"] = None
            out["unusable"] = exc.message
        out["clones"] = clone_pids(self.path / MEMORY)
        return out

    # -- building -----------------------------------------------------------------------------

    async def build(self, base: VmConfig, driver: str, *, boot_timeout: float, ready: AgentReady,
                    hypervisor_factory: Callable[[str], Hypervisor] = registry.create) -> TemplateInfo:
        """Make the template from ``base`` (no pod devices) unless a usable one exists already;
        under the exclusive lock, so concurrent callers build it once."""
        lock = self.locked(exclusive=True)
        await asyncio.to_thread(lock.__enter__)
        try:
            try:
                existing = await asyncio.to_thread(self.check)
            except TemplateUnusable as exc:
                if not (self.path / BUILD).exists():
                    raise  # a finished but damaged template is the operator's to destroy
                log.warning("template: undoing a build that did not finish (%s)", exc.message)
                existing = None
            if existing is not None:
                return existing
            await self._undo_build()
            return await self._build(base, driver, boot_timeout, ready, hypervisor_factory)
        finally:
            lock.__exit__(None, None, None)

    async def _build(self, base: VmConfig, driver: str, boot_timeout: float, ready: AgentReady,
                     hypervisor_factory: Callable[[str], Hypervisor]) -> TemplateInfo:
        t0 = time.monotonic()
        memory_bytes = base.memory_mib << 20
        await asyncio.to_thread(self._mount, base.memory_mib + DEVICE_STATE_MIB)
        hv = hypervisor_factory(driver)
        if not isinstance(hv, Snapshot):
            await asyncio.to_thread(self._unmount)
            raise FailedPrecondition(f"hypervisor {driver} cannot save VMs (no Snapshot capability)")
        vm_id = vmdir.new_vm_id()
        vm_state = vmdir.vm_dir(vm_id)
        shares = tuple(SharedDir(d.tag, str(vm_state / "shared"), d.readonly) for d in base.shared_dirs)
        cfg = replace(base, vm_id=vm_id, state_dir=str(vm_state), shared_dirs=shares, nics=(),
                      memory_file=str(self.path / MEMORY), memory_shared=True)
        try:
            fd = os.open(self.path / MEMORY, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, memory_bytes)
            finally:
                os.close(fd)
            await hv.prepare(cfg)
            _write_json(self.path / BUILD, {"driver": driver, "vm": hv.record()})
            for share in shares:
                os.makedirs(share.host_path, mode=0o700, exist_ok=True)
            await hv.start(timeout=boot_timeout)
            _write_json(self.path / BUILD, {"driver": driver, "vm": hv.record()})
            await ready(hv, cfg, boot_timeout)
            await hv.save(str(self.path))
        except BaseException:
            with contextlib.suppress(Exception):
                await hv.cleanup()
            await asyncio.to_thread(self._unmount)
            raise
        await hv.stop(force=False, timeout=5.0)
        await hv.cleanup()
        state = self.path / STATE
        info = TemplateInfo(self.path, keymod.key(keymod.shape(base, driver)), keymod.shape(base, driver),
                            memory_bytes, state.stat().st_size, _sha256(state), time.time(),
                            round(time.monotonic() - t0, 3))
        _write_json(self.path / META, info.to_json())
        (self.path / BUILD).unlink()
        log.info("template %s built in %.1fs (key %s, state %d bytes)", self.path, info.build_seconds,
                 info.key, info.state_bytes)
        return info

    def _mount(self, size_mib: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if is_mountpoint(self.path):
            raise FailedPrecondition(f"{self.path} is already a mount point")
        if any(self.path.iterdir()):
            raise FailedPrecondition(f"{self.path} is not empty; run `kata-colo-ctl factory destroy`")
        mount("tmpfs", self.path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mib}m,mode=0700")

    def _unmount(self) -> None:
        """Detach the tmpfs (lazily: clones keep their mapping) and remove the mount point."""
        while is_mountpoint(self.path):
            umount(self.path)
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)

    async def _undo_build(self) -> None:
        """Kill a template VM a killed build left (from build.json) and remove everything."""
        rec = await asyncio.to_thread(_read_json, self.path / BUILD) if (self.path / BUILD).exists() else None
        if rec is not None:
            vm = dict(rec.get("vm") or {})
            await registry.driver_class(str(rec.get("driver") or "")).recover(vm)
        await asyncio.to_thread(self._unmount)

    async def destroy(self) -> bool:
        """Remove the template (and a half-built one's VM); running clones keep running. True
        when there was anything to remove."""
        lock = self.locked(exclusive=True)
        await asyncio.to_thread(lock.__enter__)
        try:
            present = self.path.exists()
            try:
                await self._undo_build()
            except TemplateUnusable:
                await asyncio.to_thread(self._unmount)
            return present
        finally:
            lock.__exit__(None, None, None)


def clone_pids(memory_file: Path) -> list[int]:
    """Processes mapping ``memory_file`` (template clones; also after the tmpfs was detached,
    when /proc shows the path with a `` (deleted)`` suffix or none at all)."""
    want = str(memory_file)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps", encoding="utf-8", errors="replace") as f:
                if any(line.rstrip("\n").split(maxsplit=5)[-1].startswith(want) for line in f
                       if line.count(" ") >= 5):
                    found.append(int(entry))
        except OSError:
            continue
    return sorted(found)


def base_config(cfg: VmConfig) -> VmConfig:
    """``cfg`` (the sandbox's shaped VM config) without what is each VM's own, as the template
    is built from it: no NICs, disks, VFIO; each share keeps its tag."""
    shares = tuple(SharedDir(d.tag, d.host_path, d.readonly) for d in cfg.shared_dirs)
    return replace(cfg, nics=(), disks=(), vfio=(), shared_dirs=shares, vsock_fd=-1, vsock_cid=0,
                   memory_file="", memory_shared=False)

