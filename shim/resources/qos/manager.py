"""QosManager: place one sandbox's VMM threads into per-priority cgroups.

Layout (every hierarchy the driver uses)::

    <sandbox group>/                    the VMM process (v2: domain group, threaded root)
      vcpu-<priority>/                  vCPU threads of that priority (v2: threaded)
      vmm/                              every other VMM thread (v2: threaded), knobs [colo.vmm]

The sandbox group is either given (``sandbox_group=``: the pod cgroup made by
:mod:`shim.resources.podcgroup`, which also owns the offline root's knobs) — then the manager
owns only vcpu-* and vmm — or, without one, ``<cgroup_root>/<sandbox-id>``, which the manager
creates below the shared offline root ``<cgroup_root>`` (knobs from [colo.root]; created when
missing, removed only when empty, :func:`remove_offline_root`).

Idle scheduling: a priority with ``sched_idle``, or with ``cpu_idle`` on a kernel without
cpu.idle (or whose offline root asks for cpu_idle there), gets SCHED_IDLE on each of its vCPU
threads (per TID); other vCPUs are kept at SCHED_OTHER. After a failed :meth:`place` call
:meth:`cleanup`. After a crash, :meth:`from_state` (with :meth:`to_state` persisted) or the
stateless :meth:`cleanup_sandbox` / :meth:`cleanup_children` release the groups.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import ConfigError, ResourceError
from common.ids import valid_id
from shim.resources.qos import cgroupfs
from shim.resources.qos.annotation import priority_map, render_guest_json
from shim.resources.qos.detect import detect_driver
from shim.resources.qos.driver import CgroupDriver, Location
from shim.resources.qos.model import CpuKnobs, QosConfig, from_colo_config
from shim.resources.qos.placement import AFFINITY, PlaceOp, Placer, best_placer

VMM_GROUP = "vmm"
STATE_VERSION = 1


def _check_sandbox_id(sandbox_id: str) -> str:
    if not valid_id(sandbox_id):
        raise ConfigError(f"sandbox id {sandbox_id!r} cannot name a cgroup")
    return sandbox_id


class QosManager:
    def __init__(self, sandbox_id: str, config: QosConfig | Any, driver: CgroupDriver | None = None,
                 placer: Placer | None = None, sandbox_group: str | None = None) -> None:
        """``config`` is a QosConfig or shim.config.ColoConfig (converted and validated);
        ``sandbox_group`` an existing group to nest in (None: ``<cgroup_root>/<id>``, owned)."""
        self.sandbox_id = _check_sandbox_id(sandbox_id)
        self.owns_sandbox_group = sandbox_group is None
        self._sandbox_group = sandbox_group.strip("/") if sandbox_group else ""
        self.config = (config if isinstance(config, QosConfig) else from_colo_config(config)).validate()
        self.driver = driver or detect_driver()
        self.placer = placer or best_placer()
        self._lock = threading.RLock()
        self._created: list[str] = []
        self._root_created = False
        self._vcpu_threads: dict[int, int] = {}
        self._assignment: dict[int, str] = {}
        self._vmm_pid: int | None = None
        self._origin: Location | None = None

    # -- names -------------------------------------------------------------------------------
    @property
    def root_group(self) -> str:
        return self.config.cgroup_root

    @property
    def sandbox_group(self) -> str:
        return self._sandbox_group or f"{self.config.cgroup_root}/{self.sandbox_id}"

    @property
    def vmm_group(self) -> str:
        return f"{self.sandbox_group}/{VMM_GROUP}"

    def priority_group(self, priority: str) -> str:
        return f"{self.sandbox_group}/{self.config.priority(priority).group}"

    # -- placement ---------------------------------------------------------------------------
    def place(self, vcpu_threads: Mapping[int, int], vmm_pid: int, priorities: Sequence[str]) -> None:
        """Create the groups, write their knobs, put vCPU ``i`` (host TID ``vcpu_threads[i]``)
        in ``vcpu-<priorities[i]>`` and every other thread of ``vmm_pid`` in ``vmm``, then set
        affinities (pinned or the priority's cpuset)."""
        assignment = self._assignment_for(vcpu_threads, priorities)
        with self._lock:
            try:
                self._place(vcpu_threads, vmm_pid, assignment)
            except BaseException:
                self.cleanup()  # never leave half a sandbox behind
                raise

    def _place(self, vcpu_threads: Mapping[int, int], vmm_pid: int, assignment: dict[int, str]) -> None:
        if self._origin is None:
            self._origin = self.driver.process_location(vmm_pid)
        self._vmm_pid = vmm_pid
        if self.owns_sandbox_group:
            self._ensure_root()
            self._ensure(self.sandbox_group, threaded=False)
        elif not self.driver.exists(self.sandbox_group):
            raise ResourceError(f"sandbox {self.sandbox_id}: cgroup {self.sandbox_group} does not exist")
        self._ensure(self.vmm_group, threaded=True)
        self.driver.set_knobs(self.vmm_group, self._supported(self.vmm_group, self.config.vmm))
        for prio in sorted(set(assignment.values())):
            self._ensure_priority(prio)
        self.driver.adopt_process(self.sandbox_group, vmm_pid)
        self._vcpu_threads = dict(vcpu_threads)
        self._assignment = assignment
        self._apply(include_vmm=True)

    def rebalance(self, vcpu_threads: Mapping[int, int], priorities: Sequence[str] | None = None) -> None:
        """Re-place after vCPU hotplug/unplug. Without ``priorities`` known vCPUs keep theirs and
        new ones get the configured lowest (most best-effort) priority."""
        with self._lock:
            self._require_placed()
            if priorities is None:
                lowest = self.config.lowest
                assignment = {i: self._assignment.get(i, lowest) for i in vcpu_threads}
            else:
                assignment = self._assignment_for(vcpu_threads, priorities)
            for prio in sorted(set(assignment.values())):
                self._ensure_priority(prio)
            self._vcpu_threads = dict(vcpu_threads)
            self._assignment = assignment
            self._apply(include_vmm=True)
            self._prune()

    def set_vcpu_priority(self, vcpu: int, priority: str) -> None:
        """Move one vCPU to another priority, live."""
        self.config.priority(priority)
        with self._lock:
            self._require_placed()
            if vcpu not in self._vcpu_threads:
                raise ConfigError(f"sandbox {self.sandbox_id} has no vCPU {vcpu} "
                                  f"(vCPUs: {sorted(self._vcpu_threads)})")
            self._ensure_priority(priority)
            self._assignment[vcpu] = priority
            self._apply(include_vmm=False)
            self._prune()

    def _prune(self) -> None:
        """Remove vcpu-<priority> groups no vCPU uses any more (their threads have left)."""
        used = {self.priority_group(p) for p in self._assignment.values()}
        prefix = f"{self.sandbox_group}/vcpu-"
        for rel in [r for r in self._created if r.startswith(prefix) and r not in used]:
            self.driver.remove_tree(rel, self.vmm_group)
            self._created.remove(rel)

    def update_priority_knobs(self, priority: str, knobs: Mapping[str, Any]) -> None:
        """Merge ``knobs`` (keys of `[colo.priorities.<name>]`) into a priority and apply them
        live to its group and the affinities of its vCPUs."""
        with self._lock:
            new_config = self.config.with_priority_knobs(priority, knobs)
            group = f"{self.sandbox_group}/{new_config.priority(priority).group}"
            if group in self._created:
                self.driver.set_knobs(group, self._supported(group, new_config.priority(priority).knobs))
            self.config = new_config
            if self._vmm_pid is not None:
                self._apply(include_vmm=False)

    def _assignment_for(self, vcpu_threads: Mapping[int, int], priorities: Sequence[str]) -> dict[int, str]:
        if len(priorities) != len(vcpu_threads) or any(not 0 <= i < len(priorities) for i in vcpu_threads):
            raise ConfigError(f"vCPU priorities name {len(priorities)} vCPUs but the VM reports vCPUs "
                              f"{sorted(vcpu_threads)}")
        for prio in set(priorities):
            self.config.priority(prio)
        return {i: priorities[i] for i in vcpu_threads}

    def _require_placed(self) -> None:
        if self._vmm_pid is None:
            raise ResourceError(f"sandbox {self.sandbox_id}: vCPUs have not been placed yet")

    def _ensure_root(self) -> None:
        if self.driver.create(self.root_group):
            self._root_created = True
        self.driver.set_knobs(self.root_group, self._supported(self.root_group, self.config.root))

    def _ensure(self, rel: str, threaded: bool) -> None:
        if self.driver.create(rel, threaded=threaded) and rel not in self._created:
            self._created.append(rel)
        elif rel not in self._created and self.driver.exists(rel):
            self._created.append(rel)  # left by an earlier attempt of this sandbox: ours too

    def _ensure_priority(self, prio: str) -> None:
        group = self.priority_group(prio)
        if group not in self._created or not self.driver.exists(group):
            self._ensure(group, threaded=True)
            self.driver.set_knobs(group, self._supported(group, self.config.priority(prio).knobs))

    def _supported(self, group: str, knobs: CpuKnobs) -> CpuKnobs:
        """``knobs`` without cpu_idle where the kernel lacks it (the vCPUs get SCHED_IDLE)."""
        if knobs.cpu_idle is not None and not self.driver.supports_idle(group):
            return dataclasses.replace(knobs, cpu_idle=None)
        return knobs

    def thread_idle(self, priority: str) -> bool:
        """Whether vCPU threads of ``priority`` run SCHED_IDLE (see module docstring)."""
        p = self.config.priority(priority)
        if p.sched_idle:
            return True
        wants_group_idle = bool(p.knobs.cpu_idle) or (self.owns_sandbox_group and bool(self.config.root.cpu_idle))
        return wants_group_idle and not self.driver.supports_idle(self.priority_group(priority))

    def affinity(self) -> dict[int, tuple[int, ...]]:
        """vCPU index → host CPUs: one CPU per vCPU for pinned priorities (round-robin over the
        priority's CPUs in vCPU order), the priority group's CPUs otherwise."""
        masks: dict[int, tuple[int, ...]] = {}
        for prio, vcpus in priority_map(self._assignment).items():
            p = self.config.priority(prio)
            allowed = p.knobs.cpus or self.config.root.cpus or self.driver.effective_cpus(self.priority_group(prio))
            for k, vcpu in enumerate(vcpus):
                masks[vcpu] = (allowed[k % len(allowed)],) if p.pin else tuple(allowed)
        return masks

    def _apply(self, include_vmm: bool) -> None:
        masks = self.affinity()
        ops: list[PlaceOp] = []
        vcpu_tids = {tid: vcpu for vcpu, tid in self._vcpu_threads.items()}
        for vcpu, tid in sorted(self._vcpu_threads.items()):
            ops.append((tid, self.driver.attach_files(self.priority_group(self._assignment[vcpu])), masks[vcpu]))
        if include_vmm and self._vmm_pid is not None:
            vmm_files = self.driver.attach_files(self.vmm_group)
            ops.extend((tid, vmm_files, None) for tid in cgroupfs.process_threads(self._vmm_pid)
                       if tid not in vcpu_tids)
        errors = []
        for vcpu, tid in sorted(self._vcpu_threads.items()):
            err = set_thread_idle(tid, self.thread_idle(self._assignment[vcpu]))
            if err:
                errors.append(f"vCPU {vcpu} thread {tid}: cannot set its scheduling policy: {os.strerror(err)}")
        for tid, where, err in self.placer(ops):
            if tid not in vcpu_tids and err == errno.ESRCH:
                continue  # a VMM helper thread exited meanwhile
            what = f"vCPU {vcpu_tids[tid]} thread {tid}" if tid in vcpu_tids else f"VMM thread {tid}"
            action = "set affinity" if where == AFFINITY else f"write to {where}"
            errors.append(f"{what}: cannot {action}: {os.strerror(err)}")
        if errors:
            raise ResourceError(f"sandbox {self.sandbox_id}: placing threads failed: " + "; ".join(errors))

    # -- views -------------------------------------------------------------------------------
    def mapping(self) -> dict[str, list[int]]:
        """{priority: [vCPU indices]} — what the guest needs."""
        return priority_map(self._assignment)

    def guest_json(self) -> str:
        """Content of the guest's /run/kata-colo/vcpu-priorities.json."""
        order = [p.name for p in sorted(self.config.priorities.values(), key=lambda p: p.rank)]
        return render_guest_json(self._assignment, order)

    @property
    def created_groups(self) -> list[str]:
        return list(self._created)

    # -- release -----------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Move the VMM back where it came from and remove the groups this manager created
        (deepest first). Idempotent; returns the removed paths."""
        with self._lock:
            if self._vmm_pid is not None and self._origin is not None:
                self.driver.restore_process(self._vmm_pid, self._origin)
            removed: list[str] = []
            # threads that are not ours but still inside: the hierarchy root, or our given group
            fallback = "" if self.owns_sandbox_group else self.sandbox_group
            for rel in reversed(self._created):
                removed.extend(self.driver.remove_tree(rel, fallback))
            self._created.clear()
            if self._root_created:
                # Ours and now unused: remove it; another sandbox still inside keeps it (EBUSY).
                with contextlib.suppress(ResourceError):
                    if not self.driver.children(self.root_group) and self.driver.remove(self.root_group):
                        removed.append(self.root_group)
                self._root_created = False
            self._vmm_pid = None
            self._origin = None
            self._vcpu_threads.clear()
            self._assignment.clear()
            return removed

    @staticmethod
    def cleanup_sandbox(sandbox_id: str, cgroup_root: str = "kata-colo",
                        driver: CgroupDriver | None = None) -> list[str]:
        """Stateless crash cleanup: remove ``<cgroup_root>/<sandbox_id>`` and everything below,
        moving threads still inside to the hierarchy root."""
        _check_sandbox_id(sandbox_id)
        driver = driver or detect_driver()
        return driver.remove_tree(f"{cgroup_root}/{sandbox_id}", "")

    @staticmethod
    def cleanup_children(sandbox_group: str, driver: CgroupDriver | None = None) -> list[str]:
        """Stateless crash cleanup for a given (not owned) sandbox group: remove every group
        below it, moving threads still inside into the sandbox group itself."""
        driver = driver or detect_driver()
        group = sandbox_group.strip("/")
        if not group:
            raise ConfigError("refusing to clean the children of the hierarchy root")
        removed: list[str] = []
        if driver.exists(group):
            for child in driver.children(group):
                removed.extend(driver.remove_tree(child, group))
        return removed

    # -- persistence -------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """JSON-able state for state.json (enough for :meth:`from_state` + :meth:`cleanup`)."""
        return {
            "version": STATE_VERSION,
            "cgroup_version": self.driver.version,
            "sandbox_id": self.sandbox_id,
            "cgroup_root": self.config.cgroup_root,
            "sandbox_group": self.sandbox_group,
            "owns_sandbox_group": self.owns_sandbox_group,
            "created": list(self._created),
            "root_created": self._root_created,
            "vmm_pid": self._vmm_pid,
            "origin": self._origin,
            "vcpu_threads": {str(k): v for k, v in self._vcpu_threads.items()},
            "assignment": {str(k): v for k, v in self._assignment.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: QosConfig,
                   driver: CgroupDriver | None = None, placer: Placer | None = None) -> QosManager:
        if state.get("version") != STATE_VERSION:
            raise ResourceError(f"unsupported QoS state version {state.get('version')!r}")
        if state.get("cgroup_root") != config.cgroup_root:
            raise ResourceError(f"QoS state was written for cgroup root {state.get('cgroup_root')!r}, "
                                f"configuration says {config.cgroup_root!r}")
        owned = state.get("owns_sandbox_group", True)
        mgr = cls(state["sandbox_id"], config, driver, placer,
                  sandbox_group=None if owned else str(state.get("sandbox_group") or ""))
        if mgr.driver.version != state.get("cgroup_version"):
            raise ResourceError("QoS state was written for another cgroup version")
        mgr._created = [str(x) for x in state.get("created", [])]
        mgr._root_created = bool(state.get("root_created"))
        mgr._vmm_pid = state.get("vmm_pid")
        mgr._origin = state.get("origin")
        mgr._vcpu_threads = {int(k): int(v) for k, v in state.get("vcpu_threads", {}).items()}
        mgr._assignment = {int(k): str(v) for k, v in state.get("assignment", {}).items()}
        return mgr


def set_thread_idle(tid: int, idle: bool) -> int:
    """SCHED_IDLE (``idle``) or back to SCHED_OTHER for one thread id (sched_setscheduler takes
    a TID on Linux; the kernel runs it through the same path as sched_setattr). Returns the
    errno, 0 on success; a thread already in the wanted class is left alone."""
    try:
        current = os.sched_getscheduler(tid)
        if idle and current != os.SCHED_IDLE:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        elif not idle and current == os.SCHED_IDLE:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def remove_offline_root(cgroup_root: str = "kata-colo", driver: CgroupDriver | None = None) -> bool:
    """Remove the shared offline root if no sandbox group is left under it."""
    driver = driver or detect_driver()
    if driver.children(cgroup_root):
        return False
    return driver.remove(cgroup_root)
