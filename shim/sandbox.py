"""The product backend: one QEMU VM per pod, containers run by the guest agent.

The first Create of a group boots the VM (config + allowed annotations → VmConfig), connects
the agent over the configured transport, creates the guest sandbox with the 9p share mounted,
and places vCPU threads by priority (co-location QoS). Every container's rootfs (already
mounted on its bundle by the task service) is bind-mounted into the share and run by the
agent; stdio is copied between containerd's endpoints and the agent's stream calls.

Each resource is released exactly once: by :meth:`delete`/:meth:`shutdown` in a live shim, or
by :meth:`cleanup_after_crash` from the ``delete`` command using :meth:`persist_data`.
When the VM dies, the agent connection drops and every running process is reported exited
(status 255), so containerd sees exits and cleans up.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hypervisor.base import SharedDir, VmConfig
from hypervisor.qemu.driver import QemuHypervisor
from shim import config as cfgmod
from shim import oci_guest as ocispec, rootfs
from shim.backend import BackendContext, CreateOpts, ExecOpts, ExitInfo, ProcessPid, Stats
from common.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, KataColoError, NotFound)
from agent_api.client.facade import GuestAgent
from shim.resources.network import pod as podnet
from shim.stdio import ProcessIO, StdioSpec

log = logging.getLogger(__name__)

EXIT_VM_GONE = 255
OUTPUT_DRAIN_TIMEOUT = 30.0
READ_CHUNK = 32 * 1024


def vm_config(cfg: cfgmod.Config, sandbox_id: str, vm_dir: Path, share_tag: str, share_dir: Path) -> VmConfig:
    """kata-style configuration → the hypervisor's VmConfig."""
    hv = cfg.hypervisor
    params = " ".join(p for p in (hv.kernel_params,
                                  "agent.log=debug" if cfg.agent.enable_debug else "",
                                  "agent.runc_no_pivot=1" if cfg.agent.runc_no_pivot else "") if p)
    return VmConfig(
        sandbox_id=sandbox_id, state_dir=str(vm_dir), kernel=hv.kernel, initrd=hv.initrd,
        image=hv.image, kernel_params=params, vcpus=hv.default_vcpus,
        max_vcpus=hv.default_maxvcpus or max(hv.default_vcpus, os.cpu_count() or 1),
        memory_mib=hv.default_memory, max_memory_mib=hv.default_maxmemory,
        memory_slots=hv.memory_slots if hv.default_maxmemory else 0, accel=hv.accel,  # type: ignore[arg-type]
        machine=hv.machine_type, cpu_model=hv.cpu_model,
        shared_dirs=(SharedDir(share_tag, str(share_dir)),),
        agent_channel=cfg.agent.transport,  # type: ignore[arg-type]
        vsock_port=cfg.agent.vsock_port, balloon=hv.enable_balloon, pcie_root_ports=hv.pcie_root_ports,
        hypervisor_path=hv.path, debug=hv.enable_debug)


@dataclass
class _Proc:
    container_id: str
    exec_id: str
    stdio: StdioSpec
    spec: dict[str, Any]
    started: bool = False
    io: ProcessIO | None = None
    killed_before_start: bool = False


@dataclass
class _Container:
    id: str
    bundle: str
    procs: dict[str, _Proc] = field(default_factory=dict)
    shared_files: list[str] = field(default_factory=list)


class SandboxBackend:
    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.state_dir = Path(ctx.state_dir)
        self.vm_dir = self.state_dir / "vm"
        self.share = rootfs.Virtio9pShare(self.state_dir / "shared")
        self.cfg: cfgmod.Config | None = None
        self.hv: QemuHypervisor | None = None
        self.agent: GuestAgent | None = None
        self.qos: Any = None
        self.containers: dict[str, _Container] = {}
        self._vm_gone = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._boot_lock = asyncio.Lock()
        self.sandbox_container = ""
        self.network: podnet.PodNetwork | None = None

    # --- sandbox lifecycle -----------------------------------------------------------------

    async def _boot(self, opts: CreateOpts) -> None:
        cfg = cfgmod.apply_annotations(cfgmod.load(opts.config_path or self.ctx.config_path or None),
                                       opts.annotations)
        priorities = self._parse_priorities(cfg, opts.annotations)
        self.cfg = cfg
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.share.prepare()
        hv = QemuHypervisor()
        self.hv = hv
        try:
            vmcfg = vm_config(cfg, self.ctx.sandbox_id, self.vm_dir, self.share.tag, self.share.host_dir)
            vmcfg = await self._setup_network(cfg, opts.spec, vmcfg)
            await hv.prepare(vmcfg)
            try:
                await hv.start(timeout=cfg.hypervisor.boot_timeout)
            finally:
                if self.network is not None:
                    self.network.close_fds()  # QEMU holds its own copies now (or failed)
            self._spawn(self._watch_vm(hv))
            agent = GuestAgent(hv.agent_address())
            self.agent = agent
            await agent.connect(timeout=cfg.agent.dial_timeout, vm_gone=self._vm_gone)
            await agent.create_sandbox(self.ctx.sandbox_id, hostname=_hostname(opts.spec, self.ctx.sandbox_id),
                                       share_tag=self.share.tag)
            if self.network is not None:
                await agent.configure_network(*self.network.guest_config())
            if priorities:
                await self._place_vcpus(cfg, priorities)
            self._spawn(self._forward_ooms(agent))
        except BaseException:
            await self._teardown()
            raise
        log.info("sandbox %s: VM pid %s ready", self.ctx.sandbox_id, hv.vmm_pid())

    async def _setup_network(self, cfg: cfgmod.Config, spec: dict[str, Any], vmcfg: VmConfig) -> VmConfig:
        """tcfilter model: the pod netns's veths → taps → the VM's NICs (cold-plugged at boot)."""
        netns = podnet.netns_from_spec(spec)
        if not netns or cfg.runtime.internetworking_model == "none":
            return vmcfg
        queues = podnet.queues_for(vmcfg.vcpus)
        self.network = await asyncio.to_thread(podnet.PodNetwork.setup, netns, queues)
        assert self.hv is not None
        accel = self.hv.resolve_accel(vmcfg.accel)
        nics = self.network.nics(vhost=podnet.use_vhost(accel, cfg.hypervisor.disable_vhost_net))
        log.info("sandbox %s: %d NIC(s) from %s (%d queue(s))", self.ctx.sandbox_id, len(nics), netns, queues)
        return replace(vmcfg, nics=nics)

    @staticmethod
    def _parse_priorities(cfg: cfgmod.Config, annotations: dict[str, str]) -> list[str]:
        value = annotations.get(cfgmod.ANNOTATION_VCPU_PRIORITIES)
        if not value:
            return []
        from shim.resources import qos

        return list(qos.parse_vcpu_priorities(value, cfg.hypervisor.default_vcpus, cfg.colo.priorities.keys()))

    async def _place_vcpus(self, cfg: cfgmod.Config, priorities: list[str]) -> None:
        from shim.resources import qos

        assert self.hv is not None and self.agent is not None
        manager = qos.QosManager(self.ctx.sandbox_id, cfg.colo)
        threads = await self.hv.vcpu_threads()
        pid = self.hv.vmm_pid()
        assert pid is not None
        await asyncio.to_thread(manager.place, threads, pid, priorities)
        self.qos = manager  # from here on teardown releases the groups
        await self.agent.set_vcpu_priorities(manager.mapping())

    async def _watch_vm(self, hv: QemuHypervisor) -> None:
        rc = await hv.wait()
        self._vm_gone.set()
        log.warning("sandbox %s: VM exited (%s)", self.ctx.sandbox_id, rc)

    async def _forward_ooms(self, agent: GuestAgent) -> None:
        while not self._vm_gone.is_set():
            try:
                cid = await agent.next_oom()
            except KataColoError:
                return
            if cid in self.containers:
                self.ctx.on_oom(cid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _teardown(self) -> None:
        """Stop the VM and release every sandbox resource (idempotent)."""
        for t in list(self._tasks):
            t.cancel()
        for c in list(self.containers.values()):
            for p in c.procs.values():
                if p.io is not None:
                    await p.io.close()
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.hv is not None:
            with contextlib.suppress(Exception):
                await self.hv.stop(force=False, timeout=5)
            with contextlib.suppress(Exception):
                await self.hv.cleanup()
            self.hv = None
        if self.qos is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.qos.cleanup)
            self.qos = None
        if self.network is not None:
            try:
                await asyncio.to_thread(self.network.teardown)
                self.network = None
            except KataColoError as exc:  # kept: persisted state lets `delete` retry
                log.warning("sandbox %s: network teardown: %s", self.ctx.sandbox_id, exc)
        await asyncio.to_thread(self.share.cleanup)

    # --- Backend ---------------------------------------------------------------------------

    def _proc(self, cid: str, eid: str) -> _Proc:
        c = self.containers.get(cid)
        if c is None or eid not in c.procs:
            raise NotFound(f"process {cid}/{eid or 'init'} not found")
        return c.procs[eid]

    def _vm_pid(self) -> int:
        pid = self.hv.vmm_pid() if self.hv is not None else None
        return pid or os.getpid()

    def _require_agent(self) -> GuestAgent:
        if self.agent is None or self._vm_gone.is_set():
            raise FailedPrecondition(f"sandbox {self.ctx.sandbox_id} VM is not running")
        return self.agent

    async def create(self, opts: CreateOpts) -> int:
        rootfs.check_id(opts.id, "container id")
        spec = ocispec.validate(opts.spec)
        if opts.id in self.containers:
            raise AlreadyExists(f"container {opts.id} already exists")
        async with self._boot_lock:
            if self.hv is None:
                self.sandbox_container = opts.id
                await self._boot(opts)
        agent = self._require_agent()
        container = _Container(opts.id, opts.bundle)
        try:
            guest_root = await asyncio.to_thread(self.share.share_rootfs, opts.id, Path(opts.bundle) / "rootfs")

            def share_file(src: str, name: str) -> str:
                container.shared_files.append(name)
                return self.share.share_path(src, name)

            guest_spec = ocispec.to_guest(spec, opts.id, guest_root, share_file)
            await agent.create_container(opts.id, guest_spec)
        except BaseException:
            await asyncio.to_thread(self._unshare, container)
            raise
        stdio = StdioSpec(opts.stdio.stdin, opts.stdio.stdout, opts.stdio.stderr, opts.stdio.terminal)
        container.procs[""] = _Proc(opts.id, "", stdio, spec["process"])
        self.containers[opts.id] = container
        return self._vm_pid()

    def _unshare(self, container: _Container) -> None:
        for name in container.shared_files:
            self.share.unshare_path(name)
        with contextlib.suppress(KataColoError):
            self.share.unshare(container.id)

    async def exec(self, opts: ExecOpts) -> None:
        c = self.containers.get(opts.id)
        if c is None:
            raise NotFound(f"container {opts.id} not found")
        if opts.exec_id in c.procs:
            raise AlreadyExists(f"exec {opts.exec_id} already exists")
        rootfs.check_id(opts.exec_id, "exec id")
        stdio = StdioSpec(opts.stdio.stdin, opts.stdio.stdout, opts.stdio.stderr, opts.stdio.terminal)
        c.procs[opts.exec_id] = _Proc(opts.id, opts.exec_id, stdio, ocispec.process_from_exec(opts.spec))

    async def start(self, container_id: str, exec_id: str) -> int:
        p = self._proc(container_id, exec_id)
        agent = self._require_agent()
        p.io = ProcessIO(p.stdio.validate(), self.ctx.namespace, container_id)
        if exec_id:
            await agent.exec_process(container_id, exec_id, p.spec)
        else:
            await agent.start_container(container_id)
        p.started = True
        gid = exec_id  # the agent names the init process by an empty exec id

        async def read_out() -> bytes:
            return await agent.read_stdout(container_id, gid, READ_CHUNK)

        async def read_err() -> bytes:
            return await agent.read_stderr(container_id, gid, READ_CHUNK)

        async def write_in(data: bytes) -> None:
            await agent.write_stdin(container_id, gid, data)

        async def close_in() -> None:
            await agent.close_stdin(container_id, gid)

        await p.io.start(read_out, None if p.stdio.terminal else read_err, write_in, close_in)
        return self._vm_pid()

    async def wait(self, container_id: str, exec_id: str) -> ExitInfo:
        p = self._proc(container_id, exec_id)
        while not p.started:
            if p.killed_before_start or self._vm_gone.is_set():
                return ExitInfo(128 + signal.SIGKILL, _now())
            await asyncio.sleep(0.05)
        agent = self.agent
        status = EXIT_VM_GONE
        if agent is not None:
            try:
                status = await agent.wait_process(container_id, exec_id)
            except KataColoError as exc:
                log.warning("wait %s/%s: %s (reporting %d)", container_id, exec_id, exc, EXIT_VM_GONE)
        if p.io is not None:
            # containerd deletes the process (and we stop copying) right after the exit event:
            # all output must be delivered first. The bound only guards against a guest that
            # never reports EOF (a child still holding stdout); a loaded TCG guest can be slow.
            await p.io.wait_output(timeout=OUTPUT_DRAIN_TIMEOUT)
        return ExitInfo(status, _now())

    async def kill(self, container_id: str, exec_id: str, signal_: int, all: bool) -> None:
        p = self._proc(container_id, exec_id)
        if not p.started:
            p.killed_before_start = True
            if self.agent is not None and not self._vm_gone.is_set():
                with contextlib.suppress(KataColoError):
                    await self.agent.signal_process(container_id, "", signal.SIGKILL)
            return
        await self._require_agent().signal_process(container_id, exec_id, signal_, all_processes=all)

    async def delete(self, container_id: str, exec_id: str) -> None:
        c = self.containers.get(container_id)
        if c is None:
            return
        if exec_id:
            p = c.procs.pop(exec_id, None)
            if p is not None and p.io is not None:
                await p.io.close()
            return
        for p in c.procs.values():
            if p.io is not None:
                await p.io.close()
        if self.agent is not None and not self._vm_gone.is_set():
            with contextlib.suppress(KataColoError):
                await self.agent.remove_container(container_id)
        await asyncio.to_thread(self._unshare, c)
        del self.containers[container_id]
        if not self.containers or container_id == self.sandbox_container:
            await self._teardown()

    async def pids(self, container_id: str) -> list[ProcessPid]:
        self._proc(container_id, "")
        return [ProcessPid(self._vm_pid(), "")]

    async def pause(self, container_id: str) -> None:
        self._proc(container_id, "")
        await self._require_agent().pause_container(container_id)

    async def resume(self, container_id: str) -> None:
        self._proc(container_id, "")
        await self._require_agent().resume_container(container_id)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        self._proc(container_id, exec_id)
        await self._require_agent().resize_tty(container_id, exec_id, width, height)

    async def close_io(self, container_id: str, exec_id: str) -> None:
        p = self._proc(container_id, exec_id)
        if p.io is not None:
            await p.io.close_stdin()

    async def update(self, container_id: str, resources: dict[str, Any], annotations: dict[str, str]) -> None:
        self._proc(container_id, "")
        if not isinstance(resources, dict):
            raise InvalidArgument("resources must be a JSON object")
        await self._require_agent().update_container(container_id, resources)

    async def stats(self, container_id: str) -> Stats:
        self._proc(container_id, "")
        return await self._require_agent().stats(container_id)

    # --- co-location live changes (ops API; the admin socket will expose these) -------------

    def _require_qos(self) -> Any:
        if self.qos is None:
            raise FailedPrecondition(f"sandbox {self.ctx.sandbox_id} has no vCPU priorities "
                                     f"(annotation {cfgmod.ANNOTATION_VCPU_PRIORITIES})")
        return self.qos

    async def set_vcpu_priority(self, vcpu: int, priority: str) -> dict[str, list[int]]:
        """Move one vCPU to another priority at run time: its host thread changes cgroup and the
        guest's priority cpusets follow. Returns the new mapping."""
        qos = self._require_qos()
        await asyncio.to_thread(qos.set_vcpu_priority, vcpu, priority)
        mapping: dict[str, list[int]] = qos.mapping()
        await self._require_agent().set_vcpu_priorities(mapping)
        return mapping

    async def update_priority_knobs(self, priority: str, knobs: dict[str, Any]) -> None:
        """Change one priority's knobs (shares/weight, idle, quota, burst, cpuset) at run time."""
        await asyncio.to_thread(self._require_qos().update_priority_knobs, priority, knobs)

    async def shutdown(self) -> None:
        await self._teardown()

    def persist_data(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.ctx.sandbox_id,
            "sandbox_container": self.sandbox_container,
            "vm_dir": str(self.vm_dir),
            "shared_dir": str(self.share.host_dir),
            "vmm_pid": self.hv.vmm_pid() if self.hv is not None else 0,
            "qos_root": self.cfg.colo.cgroup_root if self.cfg is not None and self.qos is not None else "",
            "network": self.network.to_json() if self.network is not None else "",
        }

    async def cleanup_after_crash(self, container_id: str, bundle: str, persisted: dict[str, Any] | None) -> None:
        data = persisted or {}
        share = rootfs.Virtio9pShare(Path(data.get("shared_dir") or self.share.host_dir))
        whole = container_id in (data.get("sandbox_container"), self.ctx.sandbox_id) or not persisted
        if not whole:
            with contextlib.suppress(KataColoError):
                await asyncio.to_thread(share.unshare, container_id)
            return
        vm_dir = data.get("vm_dir") or str(self.vm_dir)
        if os.path.isdir(vm_dir):
            await QemuHypervisor.cleanup_state_dir(vm_dir, timeout=3)
        await asyncio.to_thread(share.cleanup)
        if data.get("network"):
            try:
                await asyncio.to_thread(podnet.PodNetwork.cleanup_json, data["network"])
            except KataColoError as exc:
                log.warning("sandbox %s: network cleanup: %s", self.ctx.sandbox_id, exc)
        if data.get("qos_root"):
            from shim.resources import qos

            with contextlib.suppress(Exception):
                await asyncio.to_thread(qos.QosManager.cleanup_sandbox, self.ctx.sandbox_id, data["qos_root"])


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _hostname(spec: dict[str, Any], fallback: str) -> str:
    name = spec.get("hostname") or fallback[:63]
    return str(name)
