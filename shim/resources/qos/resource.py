"""Co-location QoS as a sandbox resource: vCPU threads placed in host cgroups by priority.

Applies when the sandbox carries ``io.katacontainers.colo.vcpu-priorities`` (``high:2,low:2``).
The groups nest in the sandbox group of :mod:`shim.resources.podcgroup` (which exists before the
VMM starts) or, with ``[colo] sandbox_cgroup_only = false``, in ``<cgroup_root>/<sandbox-id>``.
The journal record names that group before any QoS group exists, so recovery after a crash at
any moment removes what lies below it (and, when the QoS resource owns it, the group itself).
After boot the vCPU threads are placed (:class:`~shim.resources.qos.manager.QosManager`) and
the guest is told the mapping; the live-change operations the admin socket exposes are here too.
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from common.errors import FailedPrecondition
from shim.resources.manager import ResourceContext
from shim.resources.podcgroup.resource import sandbox_group
from shim.resources.qos.annotation import ANNOTATION, parse_vcpu_priorities
from shim.resources.qos.manager import QosManager


class QosResource:
    kind: ClassVar[str] = "qos"

    def __init__(self, sandbox_id: str, colo: Any, priorities: list[str], sandbox_group: str | None = None) -> None:
        self.priorities = priorities
        # validates [colo] before anything boots
        self.manager = QosManager(sandbox_id, colo, sandbox_group=sandbox_group)
        self.placed = False

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> QosResource | None:
        value = ctx.annotations.get(ANNOTATION)
        if not value:
            return None
        cfg = ctx.config
        priorities = list(parse_vcpu_priorities(value, cfg.hypervisor.default_vcpus, cfg.colo.priorities.keys()))
        return cls(ctx.sandbox_id, cfg.colo, priorities, sandbox_group(ctx))

    def record(self) -> dict[str, Any]:
        return {"sandbox_id": self.manager.sandbox_id, "cgroup_root": self.manager.root_group,
                "sandbox_group": self.manager.sandbox_group,
                "owns_sandbox_group": self.manager.owns_sandbox_group,
                "state": self.manager.to_state() if self.placed else None}

    async def before_boot(self, ctx: ResourceContext) -> None:
        return None

    async def after_boot(self, ctx: ResourceContext) -> None:
        hv = ctx.hypervisor
        threads = await hv.vcpu_threads()
        pid = hv.vmm_pid()
        if pid is None:
            raise FailedPrecondition("the VM has no VMM process to place")
        self.placed = True  # from here on the groups may exist: teardown must remove them
        ctx.persist()
        await asyncio.to_thread(self.manager.place, threads, pid, self.priorities)
        await ctx.agent.set_vcpu_priorities(self.manager.mapping())

    async def teardown(self) -> None:
        if self.placed:
            await asyncio.to_thread(self.manager.cleanup)
            self.placed = False

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        sandbox_id = str(record.get("sandbox_id") or "")
        root = str(record.get("cgroup_root") or "")
        group = str(record.get("sandbox_group") or "")
        if group and not record.get("owns_sandbox_group", True):
            await asyncio.to_thread(QosManager.cleanup_children, group)
        elif sandbox_id and root:
            await asyncio.to_thread(QosManager.cleanup_sandbox, sandbox_id, root)

    # -- live changes (the admin socket) -----------------------------------------------------

    def _require_placed(self) -> QosManager:
        if not self.placed:
            raise FailedPrecondition(f"sandbox {self.manager.sandbox_id}: vCPUs are not placed yet")
        return self.manager

    async def set_vcpu_priority(self, vcpu: int, priority: str, agent: Any) -> dict[str, list[int]]:
        """Move one vCPU to another priority: its host thread changes cgroup and the guest's
        priority cpusets follow. Returns the new mapping."""
        manager = self._require_placed()
        await asyncio.to_thread(manager.set_vcpu_priority, vcpu, priority)
        mapping = manager.mapping()
        await agent.set_vcpu_priorities(mapping)
        return mapping

    async def update_priority_knobs(self, priority: str, knobs: Mapping[str, Any]) -> None:
        """Change one priority's knobs (shares/weight, idle, quota, burst, cpuset) live."""
        await asyncio.to_thread(self._require_placed().update_priority_knobs, priority, knobs)
