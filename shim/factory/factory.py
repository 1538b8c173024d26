"""VmFactory: where a sandbox's VM comes from — a pre-booted clone from the VM cache daemon, a
clone of the template, or a cold boot (kata's factory: cache → template → direct).

:meth:`VmFactory.start_vm` runs after the sandbox's resources' before-boot phase, with the VM
config they shaped. A clone is possible when the VM's shape (:mod:`shim.factory.key`) equals
the template's, the driver restores over a memory file, and every device the resources asked
for can be hot-plugged (a free PCIe root port each; not virtio-scsi LUNs, a vsock agent
channel, or free page reporting): the clone starts with the template's devices only and gets
the pod's NICs, disks and VFIO functions hot-plugged right after it resumes. Their guest PCI
paths are returned (the network resource tells the guest to wait for the NIC at that path).
Every decision not to clone is one log line saying why; every failure of a clone (a template
that turns out truncated, a cached VM that died, a device that does not plug) falls back to a
cold boot on a fresh driver instance after the failed one released everything.

The caller's ``journal(driver, record)`` is called with each VM record before the VM's process
exists (cold, template) or before this process touches it (cache: before ConfirmVM), so
``delete`` after a crash at any moment kills it. A cached VM's 9p export directories are
renamed onto the sandbox's (QEMU holds its share by fd, so a rename on the same filesystem is
invisible to it) and its QEMU moves into this shim's cgroups, where a cold-booted one would be.
Template clones are resumed; the caller then resets the guest's identity (RNG, clock).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from common.errors import KataColoError
from common.guest_paths import SHARE_TAG
from hypervisor import registry
from hypervisor.base import (
    AttachedDevice,
    Device,
    DeviceHotplug,
    HandOver,
    Hypervisor,
    PauseResume,
    SharedDir,
    Snapshot,
    VmConfig,
)
from shim.factory import key as keymod
from shim.factory import vmdir
from shim.factory.template import Template, TemplateInfo, TemplateUnusable, base_config
from shim.factory.warmup import prepare_template

log = logging.getLogger(__name__)

COLD, TEMPLATE, CACHE = "cold", "template", "cache"
Journal = Callable[[str, dict[str, Any]], None]
Attached = dict[str, AttachedDevice]


def node_vm_config(cfg: Any) -> VmConfig:
    """The VM a sandbox of the node's configuration gets before its pod devices: the config's
    VM plus the sandbox share (tag only; each VM exports its own directory), as the share
    resource adds it. The template ``factory init`` and the cache daemon build is this one."""
    from shim.sandbox.vmconfig import vm_config

    base = vm_config(cfg, "template", vmdir.vm_dir("template"))
    if cfg.hypervisor.shared_fs == "virtio-9p":
        base = replace(base, shared_dirs=(SharedDir(SHARE_TAG, "/"),))
    return base_config(base)


def free_root_ports(hv: Hypervisor, cfg: VmConfig) -> int:
    opts = cfg.options
    return int(getattr(opts, "pcie_root_ports", 0)) if isinstance(hv, DeviceHotplug) else 0


def hot_plugged(cfg: VmConfig) -> list[Device]:
    """The devices a clone of ``cfg`` gets after it resumes (the template has none of them)."""
    return [*cfg.nics, *cfg.disks, *cfg.vfio]


class VmFactory:
    def __init__(self, cfg: Any, *, sandbox_id: str = "",
                 hypervisor_factory: Callable[[str], Hypervisor] = registry.create,
                 cache: Any = None) -> None:
        self.cfg = cfg
        self.sandbox_id = sandbox_id
        self.driver = cfg.runtime.hypervisor
        self.template = Template(cfg.factory.template_path)
        self._hypervisor_factory = hypervisor_factory
        self._cache = cache

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.factory.enable_template)

    def _say(self, message: str, *args: object, level: int = logging.INFO) -> None:
        log.log(level, "sandbox %s VM: " + message, self.sandbox_id, *args)

    # -- the one entry point ------------------------------------------------------------------

    async def start_vm(self, hv: Hypervisor, vmcfg: VmConfig, journal: Journal, boot_timeout: float
                       ) -> tuple[Hypervisor, str, Attached]:
        """Start the sandbox's VM: (the driver instance running it, how — cold/template/cache —,
        the devices hot-plugged into a clone by id with their guest PCI paths)."""
        if self.enabled:
            why = self.clone_blockers(hv, vmcfg)
            if why:
                self._say("booting cold: %s", "; ".join(why))
            else:
                want = keymod.shape(base_config(vmcfg), self.driver)
                if self.cfg.factory.vm_cache_number > 0:
                    cached = await self._from_cache(vmcfg, want, journal)
                    if cached is not None:
                        return cached[0], CACHE, cached[1]
                attached = await self._from_template(hv, vmcfg, want, journal, boot_timeout)
                if attached is not None:
                    return hv, TEMPLATE, attached
                hv = self._hypervisor_factory(self.driver)  # the failed one released everything
        await hv.prepare(vmcfg)
        journal(hv.name, hv.record())
        await hv.start(timeout=boot_timeout)
        journal(hv.name, hv.record())
        return hv, COLD, {}

    def clone_blockers(self, hv: Hypervisor, vmcfg: VmConfig) -> list[str]:
        why = keymod.clone_blockers(vmcfg)
        if not isinstance(hv, Snapshot) or not hv.capabilities().clone_memory_file:
            why.append(f"hypervisor {hv.name} cannot restore clones over a template's memory file")
        if getattr(vmcfg.options, "reclaim_guest_freed_memory", False):
            why.append("reclaim_guest_freed_memory is on (free page reporting would punch holes "
                       "in the shared template file)")
        devices = hot_plugged(vmcfg)
        ports = free_root_ports(hv, vmcfg)
        if len(devices) > ports:
            why.append(f"{len(devices)} device(s) to hot-plug ({', '.join(d.id for d in devices)}) but "
                       f"pcie_root_ports = {ports}")
        return why
    # -- template -----------------------------------------------------------------------------

    async def _usable_template(self, vmcfg: VmConfig, want: dict[str, Any], boot_timeout: float
                               ) -> TemplateInfo | None:
        try:
            info = await asyncio.to_thread(self._check_locked)
            if info is None:
                self._say("no template at %s: building it", self.template.path)
                info = await self.template.build(base_config(vmcfg), self.driver, boot_timeout=boot_timeout,
                                                 ready=prepare_template, hypervisor_factory=self._hypervisor_factory)
        except TemplateUnusable as exc:
            self._say("booting cold: template unusable: %s", exc.message, level=logging.WARNING)
            return None
        except KataColoError as exc:
            self._say("booting cold: building the template failed: %s", exc.message, level=logging.WARNING)
            return None
        if info.key != keymod.key(want):
            self._say("booting cold: the template differs in %s",
                      ", ".join(keymod.differences(info.shape, want)) or "its key")
            return None
        return info

    def _check_locked(self) -> TemplateInfo | None:
        with self.template.locked(exclusive=False):
            return self.template.check()

    async def _from_template(self, hv: Hypervisor, vmcfg: VmConfig, want: dict[str, Any], journal: Journal,
                             boot_timeout: float) -> Attached | None:
        info = await self._usable_template(vmcfg, want, boot_timeout)
        if info is None:
            return None
        assert isinstance(hv, Snapshot)
        clone = replace(vmcfg, nics=(), disks=(), vfio=(), memory_file=info.memory_file, memory_shared=False)
        lock = self.template.locked(exclusive=False)  # destroy waits until the clone mapped it
        await asyncio.to_thread(lock.__enter__)
        try:
            await hv.prepare(clone)
            journal(hv.name, hv.record())
            await hv.restore(str(info.path), timeout=boot_timeout, resume=True)
            journal(hv.name, hv.record())
        except KataColoError as exc:
            self._say("template clone failed, booting cold: %s", exc.message, level=logging.WARNING)
            with contextlib.suppress(KataColoError):
                await hv.cleanup()
            return None
        finally:
            lock.__exit__(None, None, None)
        attached = await self._plug_or_discard(hv, vmcfg)
        if attached is not None:
            self._say("clone of template %s (key %s)", info.path, info.key)
        return attached

    async def _plug_or_discard(self, hv: Hypervisor, vmcfg: VmConfig) -> Attached | None:
        """Hot-plug the pod's devices into the running clone; on failure the clone goes."""
        attached: Attached = {}
        try:
            for dev in hot_plugged(vmcfg):
                assert isinstance(hv, DeviceHotplug)
                attached[dev.id] = await hv.add_device(dev)
        except KataColoError as exc:
            self._say("hot-plugging %s into the clone failed, booting cold: %s", dev.id, exc.message,
                      level=logging.WARNING)
            with contextlib.suppress(KataColoError):
                await hv.cleanup()
            return None
        return attached

    # -- cache --------------------------------------------------------------------------------

    def _cache_client(self) -> Any:
        if self._cache is None:
            from shim.factory.cache_client import CacheClient

            self._cache = CacheClient(self.cfg.factory.vm_cache_endpoint)
        return self._cache

    async def _from_cache(self, vmcfg: VmConfig, want: dict[str, Any], journal: Journal
                          ) -> tuple[Hypervisor, Attached] | None:
        """A pre-booted clone adopted by a fresh driver instance, resumed, the pod's devices
        plugged; None (logged why)."""
        cache = self._cache_client()
        try:
            vm = await cache.get_base_vm(keymod.key(want))
        except KataColoError as exc:
            self._say("no VM from the cache at %s: %s", cache.endpoint, exc.message)
            return None
        try:
            record = json.loads(vm.hypervisor)
            if not isinstance(record, dict) or vm.driver != self.driver:
                raise ValueError("not a record of this driver")
        except ValueError as exc:
            self._say("cache gave a bad VM record (%s); not using it", exc, level=logging.WARNING)
            return None
        journal(vm.driver, record)  # ours from here on: delete after a crash kills it
        hv = self._hypervisor_factory(self.driver)
        try:
            await cache.confirm_vm(vm.id)
            if not isinstance(hv, HandOver) or not isinstance(hv, PauseResume):
                raise OSError(f"hypervisor {hv.name} cannot adopt a running VM")
            await hv.adopt(record, timeout=10.0)
            journal(hv.name, hv.record())
            await asyncio.to_thread(take_shares, record, vmcfg)
            await asyncio.to_thread(join_my_cgroups, hv.vmm_pid())
            await hv.resume()
        except (KataColoError, OSError) as exc:
            self._say("cached VM %s unusable (%s); killing it", vm.id, exc, level=logging.WARNING)
            await registry.driver_class(vm.driver).recover(record)
            return None
        attached = await self._plug_or_discard(hv, vmcfg)
        if attached is None:
            return None
        self._say("pre-booted clone %s from the cache", vm.id)
        return hv, attached


def take_shares(record: dict[str, Any], vmcfg: VmConfig) -> None:
    """Rename each 9p export directory of the cached VM onto the sandbox's (empty) one."""
    theirs = {d["tag"]: d["host_path"] for d in record["config"].get("shared_dirs") or ()}
    for share in vmcfg.shared_dirs:
        src = theirs.get(share.tag)
        if src is None:
            raise OSError(f"the cached VM exports no share {share.tag!r}")
        os.rmdir(share.host_path)  # made by the share resource, still empty
        os.rename(src, share.host_path)


def join_my_cgroups(pid: int | None) -> None:
    """Move an adopted VMM into this process's cgroups (where it would be had we started it)."""
    if not pid:
        return
    from shim.resources.qos.detect import detect_driver

    try:
        driver = detect_driver()
        driver.restore_process(pid, driver.process_location(os.getpid()))
    except KataColoError as exc:
        log.warning("adopted VMM %d stays in its cgroups: %s", pid, exc.message)
