"""The sandbox (pod) cgroup as a sandbox resource — kata's ``sandbox_cgroup_only``.

Before the VMM starts, the shim process moves into the sandbox group in every hierarchy
(:mod:`.hierarchy`), so the VMM it spawns is born there and every byte and CPU-second of the VM
(guest RAM, QEMU, its threads, the shim) is accounted where Kubernetes looks: containerd's
PodSandboxStats reads the pod cgroup (the sandbox group's parent) and kubelet enforces the pod's
limits on it. The group is

* the sandbox container's OCI ``linux.cgroupsPath`` (kubelet's pod cgroup + the sandbox id, with
  the cgroupfs or systemd driver, see :mod:`.path`; ctr's ``/<namespace>/<id>``), or
* ``<cgroup_root>/<sandbox-id>`` without one: ``<cgroup_root>`` (``kata-colo``) is the offline
  root, created when missing, whose knobs come from ``[colo.root]``.

The QoS resource nests ``vcpu-<priority>`` and ``vmm`` below it. When the pod names a memory
limit (``linux.resources.memory.limit``, or containerd's ``io.kubernetes.cri.sandbox-memory``
annotation), the group's limit is ``max(pod limit, guest RAM) + [colo] memory_overhead_mib``:
the guest's RAM is the pod's memory, so a limit below it would OOM-kill the VMM rather than
limit the pod (the guest kernel enforces the container limit inside).

Journal: :meth:`record` lists every directory this sandbox may create *before* any exists (only
the missing path components, so a kubelet-made pod cgroup is never removed by us), plus where
the shim came from. Teardown moves the shim back and removes them deepest first; a shared parent
still in use (another sandbox below ``/default``) is left alone. :meth:`recover` does the same
from a fresh process, emptying the sandbox group into the hierarchy root first.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from common.errors import ConfigError
from shim.resources.manager import ResourceContext
from shim.resources.podcgroup import path as cgpath
from shim.resources.podcgroup.hierarchy import PodHierarchies
from shim.resources.qos.detect import detect_driver
from shim.resources.qos.model import root_knobs

log = logging.getLogger(__name__)

ANNOTATION_SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
MIB = 1 << 20


def sandbox_group(ctx: ResourceContext) -> str | None:
    """The group this sandbox lives in, None when ``[colo] sandbox_cgroup_only`` is off."""
    colo = ctx.config.colo
    if not colo.sandbox_cgroup_only:
        return None
    return cgpath.from_spec(ctx.spec) or f"{colo.cgroup_root}/{ctx.sandbox_id}"


def pod_memory_limit(spec: Mapping[str, Any], annotations: Mapping[str, str]) -> int | None:
    """The pod's memory limit in bytes from the sandbox spec or containerd's annotation."""
    def table(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = parent.get(key)
        return value if isinstance(value, Mapping) else {}

    limit = table(table(table(spec, "linux"), "resources"), "memory").get("limit")
    if limit is None and annotations.get(ANNOTATION_SANDBOX_MEMORY):
        raw = annotations[ANNOTATION_SANDBOX_MEMORY]
        try:
            limit = int(raw, 10)
        except ValueError:
            raise ConfigError(f"annotation {ANNOTATION_SANDBOX_MEMORY}={raw!r} is not a byte count") from None
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise ConfigError(f"linux.resources.memory.limit must be an integer, not {limit!r}")
    return limit if limit > 0 else None  # -1 / 0: unlimited


def host_memory_limit(pod_limit: int | None, guest_mib: int, overhead_mib: int) -> int | None:
    """What the sandbox group is limited to (see the module docstring); None = unlimited."""
    if pod_limit is None:
        return None
    return max(pod_limit, guest_mib * MIB) + overhead_mib * MIB


class PodCgroupResource:
    kind: ClassVar[str] = "podcgroup"

    def __init__(self, sandbox_id: str, group: str, colo: Any, memory_limit: int | None,
                 hierarchies: PodHierarchies | None = None, process: int | None = None) -> None:
        """``process`` is the pid that joins the group (default: this shim)."""
        self._process = process or os.getpid()
        self.sandbox_id = sandbox_id
        self.group = group
        self.colo = colo
        self.memory_limit = memory_limit
        self.hier = hierarchies or PodHierarchies.detect()
        self.offline_root = colo.cgroup_root if cgpath.under(group, colo.cgroup_root) else None
        self.root_knobs = root_knobs(colo) if self.offline_root else None
        self.created: dict[str, list[str]] = {}
        self.pid: int | None = None
        self.origin: dict[str, str] = {}

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> PodCgroupResource | None:
        group = sandbox_group(ctx)
        if group is None:
            return None
        cfg = ctx.config
        limit = host_memory_limit(pod_memory_limit(ctx.spec, ctx.annotations), cfg.hypervisor.default_memory,
                                  cfg.colo.memory_overhead_mib)
        return cls(ctx.sandbox_id, group, cfg.colo, limit)

    def record(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "group": self.group, "cgroup_version": self.hier.version,
                "created": {mp: list(rels) for mp, rels in self.created.items()},
                "pid": self.pid, "origin": dict(self.origin), "memory_limit": self.memory_limit}

    async def before_boot(self, ctx: ResourceContext) -> None:
        await asyncio.to_thread(self._prepare, ctx.persist)
        return None

    def _prepare(self, persist: Any) -> None:
        self.created = {mp: rels for mp, rels in self.hier.missing(self.group).items() if rels}
        persist()  # journaled before the first mkdir
        self.hier.create(self.group)
        if self.offline_root and self.root_knobs is not None:
            driver = detect_driver(self.hier.version)
            knobs = self.root_knobs
            if knobs.cpu_idle is not None and not driver.supports_idle(self.offline_root):
                import dataclasses

                knobs = dataclasses.replace(knobs, cpu_idle=None)  # the vCPUs get SCHED_IDLE instead
            driver.set_knobs(self.offline_root, knobs)
        self.hier.set_memory_limit(self.group, self.memory_limit)
        self.pid = self._process
        self.origin = self.hier.location(self.pid)
        persist()
        self.hier.join(self.group, self.pid)
        log.info("sandbox %s: shim %d joined cgroup %s (memory limit %s)", self.sandbox_id, self.pid,
                 self.group, self.memory_limit)

    async def after_boot(self, ctx: ResourceContext) -> None:
        return None

    async def teardown(self) -> None:
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        if self.pid is not None:
            self.hier.move_back(self.pid, self.origin)
        self.hier.remove(self.created, evacuate=self.group)
        self.created = {}
        self.pid = None

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        group = str(record.get("group") or "")
        created = record.get("created") or {}
        if not group or not isinstance(created, dict):
            return
        version = int(record.get("cgroup_version") or 0) or None
        hier = PodHierarchies.detect(version)
        await asyncio.to_thread(hier.remove, {str(k): [str(r) for r in v] for k, v in created.items()}, group)
