"""QemuHypervisor: one QEMU process per VM, driven over QMP (registry name ``qemu``).

Files (all under ``cfg.state_dir``, see :class:`VmPaths`): qmp.sock, agent.sock, console.log
(the guest serial console), qemu.log (QEMU's stdout/stderr), qemu.pid and, when this driver
created the directory, a marker that lets :meth:`QemuHypervisor.recover` remove the whole
directory even from a fresh process (``delete`` after a shim crash). Capabilities beyond the core:
pause/resume, device hotplug (:mod:`~hypervisor.qemu.hotplug`), memory control
(:mod:`~hypervisor.qemu.memory`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from common.errors import DeadlineExceeded, FailedPrecondition, HypervisorError, InvalidArgument, KataColoError
from common.mount import mounts_under
from hypervisor import host
from hypervisor.base import AgentAddress, Capabilities, VcpuThreads, VmConfig, vm_config_to_dict
from hypervisor.qemu import cmdline
from hypervisor.qemu.cmdline import VmPaths
from hypervisor.qemu.hotplug import HotplugMixin, Plugged
from hypervisor.qemu.memory import MemoryMixin
from hypervisor.qemu.monitor import QmpMonitor
from hypervisor.qemu.options import QemuOptions
from hypervisor.qemu.template import AdoptedProcess, SnapshotMixin
from hypervisor.vmm_process import pid_alive, tail

ReadyStep = Callable[[QmpMonitor, float], Awaitable[None]]

log = logging.getLogger(__name__)



class QemuHypervisor(HotplugMixin, MemoryMixin, SnapshotMixin):
    """Implements hypervisor.base.Hypervisor (+ PauseResume, DeviceHotplug, MemoryControl,
    Snapshot)."""

    name = "qemu"
    Options = QemuOptions

    def __init__(self, host_paths: host.HostPaths = host.HOST) -> None:
        self._host = host_paths
        self._cfg: VmConfig | None = None
        self._paths: VmPaths | None = None
        self._argv: list[str] = []
        self._created_dir = False
        self._proc: asyncio.subprocess.Process | AdoptedProcess | None = None
        self._exited: asyncio.Future[int] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._monitor: QmpMonitor | None = None
        self._devices: dict[str, Plugged] = {}
        self._dimms: list[tuple[str, int]] = []
        self._stats_polling = False
        self._accel = "tcg"
        self._released = False
        self.shutdown_reason: str | None = None

    # -- accessors ----------------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def console_log_path(self) -> str | None:
        """The guest serial console log (kept while the VM exists)."""
        return self._paths.console_log if self._paths else None

    @property
    def monitor(self) -> QmpMonitor:
        if self._monitor is None or not self._monitor.connected:
            raise FailedPrecondition("the VM is not running")
        return self._monitor

    def vmm_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def agent_address(self) -> AgentAddress:
        cfg, paths = self._require_prepared()
        if cfg.agent_channel == "vsock":
            return AgentAddress("vsock", cid=cfg.vsock_cid, port=cfg.vsock_port)
        return AgentAddress("virtio-serial", path=paths.agent_socket)

    def capabilities(self) -> Capabilities:
        """What this driver offers with the prepared config (or its defaults before prepare)."""
        opts = cmdline.options_of(self._cfg) if self._cfg is not None else QemuOptions()
        transports = ["virtio-serial"] + (["vsock"] if host.has_vhost_vsock(self._host) else [])
        return Capabilities(shared_fs=("virtio-9p",), agent_transports=tuple(transports),
                            block_drivers=cmdline.BLOCK_DRIVERS,
                            hotplug=("net", "block", "vfio") if opts.pcie_root_ports else (),
                            multiqueue_net=True,
                            memory=self.memory_mechanisms() if self._cfg is not None else (),
                            clone_memory_file=True)

    def accel(self) -> str:
        """The accelerator the VM runs (or would run) with on this host: kvm or tcg."""
        opts = cmdline.options_of(self._cfg) if self._cfg is not None else QemuOptions()
        return host.resolve_accel(opts.accel, self._host)

    def _require_prepared(self) -> tuple[VmConfig, VmPaths]:
        if self._cfg is None or self._paths is None:
            raise FailedPrecondition("hypervisor not prepared")
        return self._cfg, self._paths

    def record(self) -> dict[str, Any]:
        """state_dir + pid (what :meth:`recover` needs) and the VM's config (what
        :meth:`adopt` needs in another process)."""
        cfg, paths = self._require_prepared()
        return {"state_dir": paths.state_dir, "pid": self.vmm_pid() or 0, "vm_id": cfg.vm_id,
                "config": vm_config_to_dict(cfg)}

    # -- lifecycle ----------------------------------------------------------------------------

    async def prepare(self, cfg: VmConfig) -> None:
        if self._proc is not None:
            raise FailedPrecondition("VM already started")
        opts = cmdline.options_of(cfg)
        accel = host.resolve_accel(opts.accel, self._host)
        # vhost-net moves the NIC datapath into the host kernel; it needs KVM's ioeventfds
        vhost = accel == "kvm" and not opts.disable_vhost_net and host.has_vhost_net(self._host)
        cfg = replace(cfg, nics=tuple(replace(n, vhost=vhost) for n in cfg.nics))
        argv = cmdline.build_argv(cfg, accel)
        if not os.access(cfg.hypervisor_path, os.X_OK):
            raise InvalidArgument(f"hypervisor binary {cfg.hypervisor_path} is not executable")
        paths = VmPaths(cfg.state_dir)
        if not os.path.isdir(cfg.state_dir):
            os.makedirs(cfg.state_dir, mode=0o700)
            self._created_dir = True
            with open(paths.marker, "w", encoding="utf-8") as f:
                f.write(cfg.vm_id + "\n")
        elif os.path.exists(paths.qmp_socket) or os.path.exists(paths.pidfile):
            raise FailedPrecondition(f"{cfg.state_dir} holds another VM's files; clean it up first")
        self._cfg, self._paths, self._argv, self._accel = cfg, paths, argv, accel

    async def start(self, timeout: float) -> None:
        await self._launch(self._argv, timeout, None)

    def _incoming_argv(self) -> list[str]:
        cfg, _ = self._require_prepared()
        return cmdline.build_argv(cfg, self._accel, incoming=True)

    async def _launch(self, argv: list[str], timeout: float, ready: ReadyStep | None) -> None:
        """Run QEMU with ``argv``, connect QMP, then ``ready(monitor, remaining)`` (a restore's
        incoming migration) or, without it, check the VM runs. On failure QEMU is killed and
        every file removed, the error carrying the tails of QEMU's and the console's output."""
        cfg, paths = self._require_prepared()
        if self._proc is not None:
            raise FailedPrecondition("VM already started")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pass_fds = tuple(fd for nic in cfg.nics for fd in nic.tap_fds)
        if cfg.vsock_fd >= 0:
            pass_fds += (cfg.vsock_fd,)
        with open(paths.qemu_log, "ab") as qlog:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                    start_new_session=True, pass_fds=pass_fds)
            except OSError as exc:
                await self._discard_files()
                raise HypervisorError(f"cannot execute {cfg.hypervisor_path}: {exc}") from None
        self._track(proc)
        try:
            await self._await_boot(timeout)
            if ready is not None:
                assert self._monitor is not None
                await ready(self._monitor, max(0.1, t0 + timeout - loop.time()))
            else:
                status = await self.monitor.query_status()
                if not status.get("running"):
                    raise HypervisorError(f"VM not running after start: {status.get('status')}")
        except BaseException as exc:
            detail = self._failure_detail()
            await self._teardown_process(force=True, timeout=2.0)
            await self._discard_files()
            if isinstance(exc, KataColoError):
                exc.message = f"{exc.message}{detail}"
                raise
            raise
        log.info("qemu for %s up (pid %d) in %.2fs%s", cfg.vm_id, proc.pid, loop.time() - t0,
                 " (restored)" if ready is not None else "")

    def _track(self, proc: asyncio.subprocess.Process | AdoptedProcess) -> None:
        cfg, paths = self._require_prepared()
        self._proc = proc
        self._exited = asyncio.get_running_loop().create_future()
        self._reaper = asyncio.create_task(self._reap(proc), name=f"qemu-reaper {cfg.vm_id}")
        self._monitor = QmpMonitor(paths.qmp_socket)
        self._monitor.add_listener("SHUTDOWN", self._on_shutdown)

    async def _attach(self, proc: AdoptedProcess, timeout: float) -> None:
        """Drive an already running QEMU (:meth:`adopt`): watch it, connect QMP."""
        self._track(proc)
        try:
            await self._await_boot(timeout)
        except BaseException:
            if self._monitor is not None:
                await self._monitor.close()
            if self._reaper is not None:
                self._reaper.cancel()
            self._proc = self._exited = self._reaper = self._monitor = None
            raise
        log.info("qemu for %s adopted (pid %d)", self._require_prepared()[0].vm_id, proc.pid)

    async def _await_boot(self, timeout: float) -> None:
        """Connect QMP, giving up when QEMU exits first."""
        assert self._monitor is not None and self._exited is not None
        connect = asyncio.ensure_future(self._monitor.connect(timeout))
        exited = asyncio.shield(self._exited)
        waiting: set[asyncio.Future[Any]] = {connect, exited}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if connect not in done:
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connect
            raise HypervisorError(f"qemu exited with status {self._exited.result()} during boot")
        try:
            connect.result()
        except DeadlineExceeded:
            raise
        except KataColoError as exc:
            # QEMU dying mid-handshake resets the socket before the reaper notices the exit.
            await self._wait_exit(2.0)
            if not self._running():
                raise HypervisorError(
                    f"qemu exited with status {self._exited.result()} during boot") from None
            raise HypervisorError(f"QMP handshake failed during boot: {exc}") from None

    def console_tail(self, limit: int = 4096) -> str:
        return tail(self._paths.console_log, limit) if self._paths is not None else ""

    def _failure_detail(self) -> str:
        if self._paths is None:
            return ""
        parts = []
        for label, path in (("qemu", self._paths.qemu_log), ("console", self._paths.console_log)):
            text = tail(path)
            if text:
                parts.append(f"\n--- {label} output (tail) ---\n{text}")
        return "".join(parts)

    async def _reap(self, proc: asyncio.subprocess.Process | AdoptedProcess) -> None:
        rc = await proc.wait()
        log.info("qemu pid %d exited with %d", proc.pid, rc)
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(rc)

    def _on_shutdown(self, ev: dict[str, object]) -> None:
        data = ev.get("data")
        self.shutdown_reason = str(data.get("reason")) if isinstance(data, dict) else "unknown"

    async def wait(self) -> int:
        if self._exited is None:
            raise FailedPrecondition("VM not started")
        return await asyncio.shield(self._exited)

    def _running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    async def stop(self, force: bool = False, timeout: float = 10.0) -> None:
        if self._released:
            return  # another process owns the VM now
        await self._teardown_process(force=force, timeout=timeout)

    async def _teardown_process(self, force: bool, timeout: float) -> None:
        """quit → wait → SIGTERM → wait → SIGKILL; always reaps and closes QMP."""
        if self._running():
            assert self._proc is not None and self._exited is not None
            if not force and self._monitor is not None and self._monitor.connected:
                with contextlib.suppress(KataColoError):
                    await self._monitor.quit()
                await self._wait_exit(timeout)
            for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
                if not self._running():
                    break
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(sig)
                await self._wait_exit(grace)
            if self._running():
                raise HypervisorError(f"qemu pid {self._proc.pid} survived SIGKILL")
        if self._reaper is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
        if self._monitor is not None:
            await self._monitor.close()

    async def _wait_exit(self, timeout: float) -> None:
        assert self._exited is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)

    async def cleanup(self) -> None:
        if self._released:
            return
        await self._teardown_process(force=True, timeout=0)
        await self._discard_files()

    async def _discard_files(self) -> None:
        if self._paths is None:
            return
        self.remove_vm_files(self._paths.state_dir, remove_dir=self._created_dir)
        self._created_dir = False

    # -- crash recovery -----------------------------------------------------------------------

    @staticmethod
    def remove_vm_files(state_dir: str, remove_dir: bool | None = None) -> None:
        """Remove the files a VM keeps in ``state_dir``; the directory itself when the driver
        created it (``remove_dir`` None = decide by the marker file)."""
        paths = VmPaths(state_dir)
        if remove_dir is None:
            remove_dir = os.path.exists(paths.marker)
        if remove_dir:
            busy = mounts_under(state_dir)
            if busy:  # never delete through a mount (a share bound below a VM's own dir)
                raise HypervisorError(f"{state_dir} still has mounts below it ({busy[0]}); not removing it")
            shutil.rmtree(state_dir, ignore_errors=True)
            return
        for path in paths.files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @classmethod
    async def recover(cls, record: dict[str, object], timeout: float = 3.0) -> None:
        """Kill a leftover QEMU of ``record`` (its state dir's pidfile, the recorded pid, or any
        process whose command line names that pidfile: QEMU may have been started but not have
        written it yet) and remove its files. A pid is only killed when its command line names
        this state dir's pidfile (pid reuse guard)."""
        state_dir = str(record.get("state_dir") or "")
        if not state_dir or not os.path.isabs(state_dir):
            return
        await cls.cleanup_state_dir(state_dir, timeout, extra_pid=int(str(record.get("pid") or 0)))

    @classmethod
    async def cleanup_state_dir(cls, state_dir: str, timeout: float = 10.0, extra_pid: int = 0) -> None:
        """Kill a leftover QEMU recorded in ``state_dir`` and remove its files (see recover)."""
        paths = VmPaths(state_dir)
        try:
            with open(paths.pidfile, encoding="ascii") as f:
                pid = int(f.read().strip() or "0")
        except (FileNotFoundError, ValueError):
            pid = 0
        for candidate in {pid, extra_pid, *cls._pids_naming(paths)} - {0}:
            await cls._kill_ours(candidate, paths, timeout)
        cls.remove_vm_files(state_dir)

    @staticmethod
    def _pids_naming(paths: VmPaths) -> list[int]:
        """Processes whose argv names this VM's pidfile (a QEMU that has not written it yet)."""
        want = os.fsencode(paths.pidfile)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if want in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return found

    @classmethod
    async def _kill_ours(cls, pid: int, paths: VmPaths, timeout: float) -> None:
        if pid > 0 and pid_alive(pid) and cls._is_our_qemu(pid, paths):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while pid_alive(pid):
                if time.monotonic() > deadline:
                    raise HypervisorError(f"leftover qemu pid {pid} did not die")
                await asyncio.sleep(0.05)

    @staticmethod
    def _is_our_qemu(pid: int, paths: VmPaths) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            return False
        return os.fsencode(paths.pidfile) in args

    # -- runtime operations -------------------------------------------------------------------

    async def vcpu_threads(self) -> VcpuThreads:
        pid = self.vmm_pid()
        cpus = await self.monitor.query_cpus_fast()
        threads: VcpuThreads = {}
        for cpu in cpus:
            if not os.path.exists(f"/proc/{pid}/task/{cpu.thread_id}"):
                raise HypervisorError(f"vCPU {cpu.cpu_index} thread {cpu.thread_id} is not a thread "
                                      f"of qemu pid {pid}")
            threads[cpu.cpu_index] = cpu.thread_id
        return threads

    async def balloon(self, target_bytes: int) -> None:
        cfg, _ = self._require_prepared()
        if cfg.memory_file and not cfg.memory_shared:
            # QEMU 7.2 discards inflated pages of a private file mapping by punching holes in the
            # file itself: the template every other clone maps would read zeros there
            raise FailedPrecondition("the balloon cannot be inflated on a template clone (QEMU would "
                                     "discard pages of the shared template file)")
        await super().balloon(target_bytes)

    async def pause(self) -> None:
        await self.monitor.stop()

    async def resume(self) -> None:
        await self.monitor.cont()

    async def status(self) -> str:
        return str((await self.monitor.query_status()).get("status"))
