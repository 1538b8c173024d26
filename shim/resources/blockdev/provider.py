"""The rootfs-provider seam of :class:`shim.sandbox.containers.ContainerOps`: per container, a
rootfs on the 9p share or on block devices, plus the container's data disks and VFIO devices.

* :meth:`StorageProvider.before_boot` (the sandbox's first container): plan it and *offer* its
  :class:`~shim.resources.blockdev.resource.ContainerStorage` to the sandbox's boot
  (:func:`shim.resources.offer_for_boot`), so its disks and VFIO devices are cold-plugged;
* :meth:`StorageProvider.attach`: for later containers, plan and attach the resource to the
  running sandbox (hot-plug; a failure half way is rolled back by the ResourceManager); then the
  guest view (root path, Storage/Device dicts, OCI rewrites). A container whose rootfs cannot be
  a block rootfs gets the 9p share, exactly as before;
* :meth:`StorageProvider.release`: after the agent removed the container (and unmounted its
  storages): hot-unplug and delete its disks, or unbind its 9p rootfs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ResourceExhausted
from hypervisor.base import DeviceHotplug
from shim import config as cfgmod
from shim import resources
from shim.backend import CreateOpts
from shim.resources.blockdev import plan as plan_mod
from shim.resources.blockdev.cache import LayerCache
from shim.resources.manager import ResourceContext
from shim.resources.sharefs import Virtio9pShare

log = logging.getLogger(__name__)


@dataclass
class ContainerRootfs:
    """A container's guest-side storage (``mode`` block | snapshot | 9p)."""

    mode: str
    view: plan_mod.GuestView
    key: str = ""


def storage_key(container_id: str) -> str:
    return f"storage-{container_id}"


class StorageProvider:
    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self._plans: dict[str, plan_mod.Plan] = {}
        self._rootfs: dict[str, ContainerRootfs] = {}

    def _config(self, opts: CreateOpts) -> cfgmod.Config:
        if self.sandbox.cfg is not None:
            return self.sandbox.cfg
        return cfgmod.apply_annotations(cfgmod.load(opts.config_path or self.sandbox.ctx.config_path or None),
                                        opts.annotations)

    @staticmethod
    def _cache(cfg: cfgmod.Config) -> LayerCache:
        st = cfg.storage
        return LayerCache(st.layer_cache_dir, st.layer_cache_max_mib << 20, st.layer_image_format)

    async def before_boot(self, opts: CreateOpts, spec: dict[str, Any]) -> None:
        """Plan the first container; its disks/devices are offered for cold-plug."""
        cfg = self._config(opts)
        plan = await plan_mod.make_plan(cfg, self.sandbox.id, opts.id, opts.rootfs, spec, cold=True,
                                        hotplug=(), cache=self._cache(cfg))
        self._plans[opts.id] = plan
        self._log_plan(opts.id, plan)
        if plan.resource is not None:
            resources.offer_for_boot(self.sandbox.id, plan.resource)

    def boot_done(self, opts: CreateOpts) -> None:
        """The boot has run (or failed): an offer it did not take releases its leases."""
        left = resources.withdraw_offers(self.sandbox.id)
        for r in left:
            for lease in getattr(r, "leases", []):
                lease.release()
        if left:
            self._plans.pop(opts.id, None)

    def _log_plan(self, cid: str, plan: plan_mod.Plan) -> None:
        if plan.rootfs_mode == "9p":
            log.info("container %s: rootfs on the 9p share (%s)", cid, plan.reason or "no block rootfs")
        else:
            log.info("container %s: %s rootfs, %d layer image(s), %d from the cache (%.2fs)", cid,
                     plan.rootfs_mode, plan.lowers, plan.cache_hits, plan.cache_seconds)

    def _context(self, cfg: cfgmod.Config, spec: dict[str, Any]) -> ResourceContext:
        sb = self.sandbox
        return ResourceContext(sandbox_id=sb.id, state_dir=sb.state_dir, config=cfg, spec=spec,
                               hypervisor=sb.hv, vcpus=cfg.hypervisor.default_vcpus, agent=sb.agent)

    async def attach(self, opts: CreateOpts, spec: dict[str, Any], share: Virtio9pShare | None) -> ContainerRootfs:
        plan = self._plans.get(opts.id)
        key = storage_key(opts.id)
        if plan is None:
            cfg = self._config(opts)
            hotplug = _hotplug_kinds(self.sandbox.hv)
            plan = await plan_mod.make_plan(cfg, self.sandbox.id, opts.id, opts.rootfs, spec, cold=False,
                                            hotplug=hotplug, cache=self._cache(cfg))
            self._log_plan(opts.id, plan)
            if plan.resource is not None:
                try:
                    await self.sandbox.resources.attach(plan.resource, self._context(cfg, spec), key)
                except ResourceExhausted as exc:
                    if plan.rootfs_mode != "block":
                        raise
                    # out of root ports: the rootfs goes on the share, its data disks still get theirs
                    plan = await plan_mod.make_plan(cfg, self.sandbox.id, opts.id, opts.rootfs, spec, cold=False,
                                                    hotplug=hotplug, cache=self._cache(cfg),
                                                    block_reason=f"block rootfs hot-plug failed: {exc}")
                    self._log_plan(opts.id, plan)
                    if plan.resource is not None:
                        await self.sandbox.resources.attach(plan.resource, self._context(cfg, spec), key)
            self._plans[opts.id] = plan
        try:
            view = plan_mod.guest_view(plan, opts.id)
            if plan.rootfs_mode == "9p":
                if share is None:
                    raise_no_share(self.sandbox.id)
                assert share is not None
                view.root_path = await asyncio.to_thread(share.share_rootfs, opts.id, Path(opts.bundle) / "rootfs")
        except BaseException:
            await self.release(opts.id, share)
            raise
        rootfs = ContainerRootfs(plan.rootfs_mode, view, key if plan.resource is not None else "")
        self._rootfs[opts.id] = rootfs
        return rootfs

    async def release(self, container_id: str, share: Virtio9pShare | None) -> None:
        """Undo :meth:`attach` (idempotent). A cold-plugged (boot) container's disks stay until
        the sandbox stops."""
        plan = self._plans.pop(container_id, None)
        self._rootfs.pop(container_id, None)
        try:
            if plan is not None and plan.resource is not None and not plan.resource.cold:
                await self.sandbox.resources.detach(storage_key(container_id))
        finally:
            if share is not None and (plan is None or plan.rootfs_mode == "9p"):
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(share.unshare, container_id)


def _hotplug_kinds(hv: Any) -> tuple[str, ...]:
    """Device kinds the running VM can hot-plug (none without the DeviceHotplug capability)."""
    if hv is None or not isinstance(hv, DeviceHotplug):
        return ()
    caps = getattr(hv, "capabilities")()  # noqa: B009 - the core protocol's method; mypy narrowed hv
    return tuple(caps.hotplug)


def raise_no_share(sandbox_id: str) -> None:
    from common.errors import Unimplemented

    raise Unimplemented(f"sandbox {sandbox_id} has no shared filesystem for container rootfs")
