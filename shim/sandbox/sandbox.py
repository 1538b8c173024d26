"""Sandbox: one pod's VM and the host resources it needs — the handle the Task service's container
operations and the management server share (built once at the composition root, shim.cli).

:meth:`Sandbox.start` (the pod's first Create): configuration + allowed annotations → the
resources' before-boot phase (each journaled first, :mod:`shim.resources.manager`) → the
hypervisor driver named by ``[runtime] hypervisor`` (:mod:`hypervisor.registry`; the sandbox
imports no concrete driver) prepares, is journaled, starts → the agent connects → CreateSandbox
(hostname, the resources' storages) → the resources' after-boot phase. The VM itself comes from
:class:`shim.factory.factory.VmFactory`: a cold boot, a clone of the VM template or a
pre-booted clone from the VM cache (``[factory]``); a clone is resumed, gets the pod's devices
hot-plugged and its guest RNG reseeded and clock set. The VM has its own id (``<state>/vm``
holds its files; a pre-booted VM's directory ``/run/kata-colo/vm/<vm-id>`` is linked there).
A failure at any step
runs :meth:`stop`, which releases exactly what was made. :func:`recover` does the same from the
journal alone, for ``delete`` after the shim was killed at any moment.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent_api.client.facade import GuestAgent
from common.errors import FailedPrecondition, KataColoError
from hypervisor import host, registry
from hypervisor.base import AgentAddress, GuestConsole, Hypervisor, apply_patches
from shim import config as cfgmod
from shim import resources
from shim.backend import BackendContext, CreateOpts
from shim.factory import vmdir
from shim.factory.factory import VmFactory
from shim.resources import manager as resource_manager
from shim.resources.manager import ResourceContext, ResourceManager
from shim.sandbox.vmconfig import vm_config

log = logging.getLogger(__name__)

VM_RECORD = "vm"
STOP_TIMEOUT = 5.0
RNG_SEED_BYTES = 512  # kata's ReseedRNG: from the host's urandom


class State(enum.Enum):
    NEW = "new"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


HypervisorFactory = Callable[[str], Hypervisor]
AgentFactory = Callable[[AgentAddress], GuestAgent]


async def _recover_vm(record: dict[str, Any]) -> None:
    await registry.driver_class(str(record.get("driver") or "")).recover(record)


def recover_functions() -> dict[str, Callable[[dict[str, Any]], Awaitable[None]]]:
    return {**resources.recover_functions(), VM_RECORD: _recover_vm}


async def recover(state_dir: Path, timeout: float = 4.0) -> None:
    """Undo a sandbox from its journal alone (a fresh process; the shim is gone)."""
    await resource_manager.recover(state_dir, recover_functions(), timeout)


def _hostname(spec: dict[str, Any], fallback: str) -> str:
    return str(spec.get("hostname") or fallback[:63])


class Sandbox:
    """One pod's VM. Not thread-safe: used from the shim's event loop."""

    def __init__(self, ctx: BackendContext, *, hypervisor_factory: HypervisorFactory = registry.create,
                 agent_factory: AgentFactory = GuestAgent) -> None:
        self.ctx = ctx
        self.id = ctx.sandbox_id
        self.state_dir = Path(ctx.state_dir)
        # the VM's files; a pre-booted VM's are in its own dir, linked here (shim.factory.vmdir)
        self.vm_dir = self.state_dir / vmdir.SANDBOX_LINK
        self.resources = ResourceManager(self.id, self.state_dir)
        self.state = State.NEW
        self.cfg: cfgmod.Config | None = None
        self.hv: Hypervisor | None = None
        self.agent: GuestAgent | None = None
        self.vm_gone = asyncio.Event()
        self.started_at = 0.0
        self.vm_exit_status: int | None = None
        self._rctx: ResourceContext | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop_lock = asyncio.Lock()
        self._hypervisor_factory = hypervisor_factory
        self._agent_factory = agent_factory

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, opts: CreateOpts) -> None:
        """Boot the VM for the pod whose first container ``opts`` describes."""
        if self.state is not State.NEW:
            raise FailedPrecondition(f"sandbox {self.id} is {self.state.value}")
        self.state = State.BOOTING
        try:
            await self._boot(opts)
        except BaseException as exc:
            try:
                await self.stop()
            except Exception as cleanup:  # noqa: BLE001 - the boot error is the one to report
                exc.add_note(f"cleanup after the failed boot also failed: {cleanup}")
            raise
        self.state = State.RUNNING
        log.info("sandbox %s: VM pid %s ready", self.id, self.vmm_pid())

    async def _boot(self, opts: CreateOpts) -> None:
        cfg = cfgmod.apply_annotations(cfgmod.load(opts.config_path or self.ctx.config_path or None),
                                       opts.annotations)
        self.cfg = cfg
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        hv = self._hypervisor_factory(cfg.runtime.hypervisor)
        self.hv = hv
        rctx = ResourceContext(sandbox_id=self.id, state_dir=self.state_dir, config=cfg, spec=opts.spec,
                               hypervisor=hv, vcpus=cfg.hypervisor.default_vcpus)
        self._rctx = rctx
        wanted = resources.for_sandbox(rctx)
        patches = await self.resources.before_boot(wanted, rctx)
        vm_id = vmdir.new_vm_id()  # the VM's identity is not the sandbox's (a cached clone's is older)
        vmcfg = apply_patches(vm_config(cfg, vm_id, self.vm_dir), patches)
        cid: host.VsockCid | None = None
        if vmcfg.agent_channel == "vsock":  # kata's FindContextID: a CID reserved on an fd the VMM gets
            cid = await asyncio.to_thread(host.reserve_vsock_cid)
            vmcfg = replace(vmcfg, vsock_cid=cid.cid, vsock_fd=cid.fd)
        try:
            hv, how, rctx.attached = await self._vm_factory(cfg).start_vm(
                hv, vmcfg, self._journal_vm, boot_timeout=cfg.hypervisor.boot_timeout)
        finally:
            if cid is not None:
                cid.close()  # the VMM holds its own copy (or failed)
        self.hv = rctx.hypervisor = hv
        rctx.plugged_at_boot = how == "cold"  # a clone got the pod's devices hot-plugged
        if how == "cache":  # kata's VM.assignSandbox: the VM's own dir, made before the sandbox
            vmdir.assign_sandbox(str(hv.record().get("state_dir", "")), self.state_dir)
        self.started_at = time.time()
        self.spawn(self._watch_vm(hv))
        agent = self._agent_factory(hv.agent_address())
        self.agent = agent
        await agent.connect(timeout=cfg.agent.dial_timeout, vm_gone=self.vm_gone)
        if how != "cold":  # every clone resumed with the template's RNG state and clock
            await agent.reset_identity(os.urandom(RNG_SEED_BYTES))
        storages = [s for r in self.resources.resources() for s in getattr(r, "guest_storages", list)()]
        await agent.create_sandbox(self.id, hostname=_hostname(dict(opts.spec), self.id), storages=storages)
        rctx.agent = agent
        await self.resources.after_boot(rctx)

    def _journal_vm(self, driver: str, record: dict[str, Any]) -> None:
        """The VM record, written before its VMM starts (or before a cached one is ours)."""
        self.resources.note(VM_RECORD, {"driver": driver, **record})

    def _vm_factory(self, cfg: cfgmod.Config) -> VmFactory:
        return VmFactory(cfg, sandbox_id=self.id, hypervisor_factory=self._hypervisor_factory)

    async def _watch_vm(self, hv: Hypervisor) -> None:
        rc = await hv.wait()
        self.vm_exit_status = rc
        self.vm_gone.set()
        if self.state is not State.STOPPING:
            log.warning("sandbox %s: VM exited (%s)", self.id, rc)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task that lives as long as the VM (cancelled by :meth:`stop`)."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Stop the VM and release every resource (idempotent; concurrent callers — e.g. two
        containers' Deletes after the VM died — wait for the one teardown). Raises
        ResourceError naming the resources that could not be released (they stay journaled for
        ``delete``)."""
        async with self._stop_lock:
            await self._stop()

    async def _stop(self) -> None:
        if self.state in (State.NEW, State.STOPPED):
            self.state = State.STOPPED
            return
        self.state = State.STOPPING
        for t in list(self._tasks):
            t.cancel()
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        hv, self.hv = self.hv, None
        try:
            if hv is not None:
                await self._stop_vm(hv)
            await self.resources.teardown()
        finally:
            self.state = State.STOPPED

    async def _stop_vm(self, hv: Hypervisor) -> None:
        try:
            await hv.stop(force=False, timeout=STOP_TIMEOUT)
        except KataColoError as exc:
            log.warning("sandbox %s: VM stop: %s (killing it)", self.id, exc)
        await hv.cleanup()  # raises when the VMM survives SIGKILL: the record stays for delete
        with contextlib.suppress(KataColoError):
            self.resources.forget(VM_RECORD)

    # -- views --------------------------------------------------------------------------------

    def vmm_pid(self) -> int | None:
        return self.hv.vmm_pid() if self.hv is not None else None

    def console_tail(self, limit: int = 4096) -> str:
        """The guest console's last bytes ("" when the driver keeps no console log)."""
        return self.hv.console_tail(limit) if isinstance(self.hv, GuestConsole) else ""

    def require_agent(self) -> GuestAgent:
        if self.agent is None or self.vm_gone.is_set() or self.state is not State.RUNNING:
            raise FailedPrecondition(f"sandbox {self.id} VM is not running")
        return self.agent

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING and not self.vm_gone.is_set()

    def resource(self, kind: str) -> Any:
        return self.resources.get(kind)

    # -- co-location live changes (the admin socket) ------------------------------------------

    def _require_qos(self) -> Any:
        qos = self.resource("qos")
        if qos is None:
            raise FailedPrecondition(f"sandbox {self.id} has no vCPU priorities "
                                     f"(annotation {cfgmod.ANNOTATION_VCPU_PRIORITIES})")
        return qos

    async def set_vcpu_priority(self, vcpu: int, priority: str) -> dict[str, list[int]]:
        """Move one vCPU to another priority at run time; returns the new mapping."""
        mapping: dict[str, list[int]] = await self._require_qos().set_vcpu_priority(
            vcpu, priority, self.require_agent())
        self.resources.persist()
        return mapping

    async def update_priority_knobs(self, priority: str, knobs: dict[str, Any]) -> None:
        """Change one priority's knobs (shares/weight, idle, quota, burst, cpuset) at run time."""
        await self._require_qos().update_priority_knobs(priority, knobs)
        self.resources.persist()

    # -- memory elasticity (the admin socket, containerd Update, the node policy) -------------

    def _require_memory(self) -> Any:
        mem = self.resource("memory")
        if mem is None:
            raise FailedPrecondition(f"sandbox {self.id}: its hypervisor has no memory control")
        return mem

    async def set_memory(self, target_bytes: int) -> Any:
        """Resize the VM to ``target_bytes`` (:meth:`MemoryResource.resize`): the
        :class:`~shim.resources.memory.ResizeResult`; MemoryLimitError outside [floor, max],
        MemoryTimeout (with the size reached) when the guest did not follow in time."""
        self.require_agent()
        try:
            return await self._require_memory().resize(target_bytes)
        finally:
            self.resources.persist()

    async def memory_view(self) -> dict[str, Any]:
        """The memory state from the VMM and the last guest numbers (the guest is not asked)."""
        doc: dict[str, Any] = await self._require_memory().view()
        return doc

    async def memory_limits(self) -> dict[str, Any]:
        """The memory state with limits computed from the guest's memory asked now."""
        self.require_agent()
        mem = self._require_memory()
        info, lim = await mem.limits(fresh=True)
        doc: dict[str, Any] = await mem.view()
        doc.update(floor_bytes=lim.floor, max_bytes=lim.max, lowest_bytes=lim.lowest)
        doc["guest"]["used_bytes"] = lim.used
        return doc

    async def grow_memory_for_containers(self, limits_bytes: int) -> None:
        """kata's updateResources for memory: the VM needs ``default_memory`` + the containers'
        limits; grow to that when it has less (never shrink: that is the operator's or the node
        policy's call). A no-op with ``[runtime] static_sandbox_resource_mgmt`` or without
        memory hotplug; MemoryLimitError when that is over the VM's maximum."""
        mem = self.resource("memory")
        cfg = self.cfg
        if mem is None or cfg is None or cfg.runtime.static_sandbox_resource_mgmt or limits_bytes <= 0:
            return
        if not {"virtio-mem", "dimm"} & set(mem.mechanisms()):
            log.info("sandbox %s: container memory limits need %d MiB more, but the VM has no memory "
                     "hotplug (default_maxmemory)", self.id, limits_bytes >> 20)
            return
        want = (cfg.hypervisor.default_memory << 20) + limits_bytes
        if want <= mem.target:
            return
        await self.set_memory(want)
