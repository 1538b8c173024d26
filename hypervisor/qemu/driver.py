"""QemuHypervisor: one QEMU process per sandbox VM, driven over QMP.

Files (all under ``cfg.state_dir``, see :class:`VmPaths`): qmp.sock, agent.sock, console.log
(the guest serial console), qemu.log (QEMU's stdout/stderr), qemu.pid and, when this driver
created the directory, a marker that lets :meth:`QemuHypervisor.cleanup_state_dir` remove the
whole directory even from a fresh process (``delete`` after a shim crash).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass

from hypervisor.base import (AgentAddress, BalloonInfo, BlockDevice, Capabilities, Device,
                             NetDevice, VcpuThreads, VfioDevice, VmConfig)
from hypervisor.qemu import cmdline
from hypervisor.qemu.cmdline import VmPaths
from hypervisor.qemu.monitor import QmpMonitor
from common.errors import (DeadlineExceeded, FailedPrecondition, HypervisorError, InvalidArgument,
                         KataColoError, NotFound, ResourceExhausted)

log = logging.getLogger(__name__)

TAIL_BYTES = 2048
MEMORY_ALIGN_MIB = 128
BALLOON_POLL_SECONDS = 2
_UNREPORTED = 2**63


@dataclass
class _Plugged:
    kind: str
    port: str
    backend: str


def _tail(path: str, limit: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - limit, 0))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


class QemuHypervisor:
    """Implements hypervisor.base.Hypervisor with QEMU."""

    def __init__(self, cpuinfo_path: str = "/proc/cpuinfo") -> None:
        self._cpuinfo_path = cpuinfo_path
        self._cfg: VmConfig | None = None
        self._paths: VmPaths | None = None
        self._argv: list[str] = []
        self._created_dir = False
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._monitor: QmpMonitor | None = None
        self._devices: dict[str, _Plugged] = {}
        self._dimms: list[tuple[str, int]] = []
        self._stats_polling = False
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
        cfg, _ = self._require_prepared()
        ports = cfg.pcie_root_ports > 0
        return Capabilities(block_hotplug=ports, net_hotplug=ports, vfio_hotplug=ports,
                            multiqueue_net=True,
                            memory_hotplug=cfg.max_memory_mib > cfg.memory_mib and cfg.memory_slots > 0,
                            balloon=cfg.balloon, vsock=cfg.agent_channel == "vsock",
                            shared_fs="virtio-9p")

    def _require_prepared(self) -> tuple[VmConfig, VmPaths]:
        if self._cfg is None or self._paths is None:
            raise FailedPrecondition("hypervisor not prepared")
        return self._cfg, self._paths

    def _cpuinfo(self) -> str:
        with open(self._cpuinfo_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def resolve_accel(self, accel: str) -> str:
        """The accelerator ``accel`` (auto|kvm|tcg) means on this host, as ``prepare`` uses it."""
        return cmdline.resolve_accel(accel, self._cpuinfo())

    # -- lifecycle ----------------------------------------------------------------------------

    async def prepare(self, cfg: VmConfig) -> None:
        if self._proc is not None:
            raise FailedPrecondition("VM already started")
        argv = cmdline.build_argv(cfg, self._cpuinfo())
        if not os.access(cfg.hypervisor_path, os.X_OK):
            raise InvalidArgument(f"hypervisor binary {cfg.hypervisor_path} is not executable")
        paths = VmPaths(cfg.state_dir)
        if not os.path.isdir(cfg.state_dir):
            os.makedirs(cfg.state_dir, mode=0o700)
            self._created_dir = True
            with open(paths.marker, "w", encoding="utf-8") as f:
                f.write(cfg.sandbox_id + "\n")
        elif os.path.exists(paths.qmp_socket) or os.path.exists(paths.pidfile):
            raise FailedPrecondition(f"{cfg.state_dir} holds another VM's files; clean it up first")
        self._cfg, self._paths, self._argv = cfg, paths, argv

    async def start(self, timeout: float) -> None:
        cfg, paths = self._require_prepared()
        if self._proc is not None:
            raise FailedPrecondition("VM already started")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pass_fds = tuple(fd for nic in cfg.nics for fd in nic.tap_fds)
        with open(paths.qemu_log, "ab") as qlog:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self._argv, stdin=asyncio.subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                    start_new_session=True, pass_fds=pass_fds)
            except OSError as exc:
                await self._discard_files()
                raise HypervisorError(f"cannot execute {cfg.hypervisor_path}: {exc}") from None
        self._exited = loop.create_future()
        self._reaper = asyncio.create_task(self._reap(self._proc), name=f"qemu-reaper {cfg.sandbox_id}")
        self._monitor = QmpMonitor(paths.qmp_socket)
        self._monitor.add_listener("SHUTDOWN", self._on_shutdown)
        try:
            await self._await_boot(timeout)
        except BaseException as exc:
            detail = self._failure_detail()
            await self._teardown_process(force=True, timeout=2.0)
            await self._discard_files()
            if isinstance(exc, KataColoError):
                exc.message = f"{exc.message}{detail}"
                raise
            raise
        log.info("qemu for %s up (pid %d) in %.2fs", cfg.sandbox_id, self._proc.pid, loop.time() - t0)

    async def _await_boot(self, timeout: float) -> None:
        assert self._monitor is not None and self._exited is not None
        connect = asyncio.ensure_future(self._monitor.connect(timeout))
        exited = asyncio.shield(self._exited)
        done, _ = await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
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
        status = await self._monitor.query_status()
        if not status.get("running"):
            raise HypervisorError(f"VM not running after start: {status.get('status')}")

    def _failure_detail(self) -> str:
        if self._paths is None:
            return ""
        parts = []
        for label, path in (("qemu", self._paths.qemu_log), ("console", self._paths.console_log)):
            text = _tail(path)
            if text:
                parts.append(f"\n--- {label} output (tail) ---\n{text}")
        return "".join(parts)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
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
            shutil.rmtree(state_dir, ignore_errors=True)
            return
        for path in paths.files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @classmethod
    async def cleanup_state_dir(cls, state_dir: str, timeout: float = 10.0) -> None:
        """Kill a leftover QEMU recorded in ``state_dir``'s pidfile and remove its files.

        For ``delete`` after a shim crash: needs nothing but the state directory. The pid is
        only killed when its command line names this state dir's pidfile (pid reuse guard).
        """
        paths = VmPaths(state_dir)
        try:
            with open(paths.pidfile, encoding="ascii") as f:
                pid = int(f.read().strip() or "0")
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid > 0 and _pid_alive(pid) and cls._is_our_qemu(pid, paths):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid):
                if time.monotonic() > deadline:
                    raise HypervisorError(f"leftover qemu pid {pid} did not die")
                await asyncio.sleep(0.05)
        cls.remove_vm_files(state_dir)

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

    async def pause(self) -> None:
        await self.monitor.stop()

    async def resume(self) -> None:
        await self.monitor.cont()

    async def status(self) -> str:
        return str((await self.monitor.query_status()).get("status"))

    def _free_port(self) -> str:
        cfg, _ = self._require_prepared()
        used = {p.port for p in self._devices.values()}
        for i in range(cfg.pcie_root_ports):
            if f"rp{i}" not in used:
                return f"rp{i}"
        raise ResourceExhausted(f"no free pcie-root-port for hotplug ({cfg.pcie_root_ports} configured)")

    async def add_device(self, dev: Device) -> None:
        cmdline.check_device_id(dev.id)
        if dev.id in self._devices:
            raise InvalidArgument(f"device {dev.id} already attached")
        mon = self.monitor
        port = self._free_port()
        if isinstance(dev, NetDevice):
            cmdline.validate_nic(dev)
            backend = f"{dev.id}-net"
            names = [f"{dev.id}-fd{i}" for i in range(len(dev.tap_fds))]
            for fd, name in zip(dev.tap_fds, names):
                await mon.send_fd(fd, name)
            props: dict[str, object] = {"vhost": dev.vhost}
            if len(names) == 1:
                props["fd"] = names[0]
            else:
                props["fds"] = ":".join(names)
            await mon.netdev_add("tap", backend, **props)
            dev_props: dict[str, object] = {"netdev": backend, "mac": dev.mac, "bus": port}
            if len(names) > 1:
                dev_props.update(mq=True, vectors=2 * len(names) + 2)
            try:
                await mon.device_add("virtio-net-pci", dev.id, **dev_props)
            except KataColoError:
                with contextlib.suppress(KataColoError):
                    await mon.netdev_del(backend)
                raise
            self._devices[dev.id] = _Plugged("net", port, backend)
        elif isinstance(dev, VfioDevice):
            await mon.device_add("vfio-pci", dev.id, host=dev.host, bus=port)
            self._devices[dev.id] = _Plugged("vfio", port, "")
        elif isinstance(dev, BlockDevice):
            backend = f"{dev.id}-blk"
            await mon.blockdev_add({"driver": "raw", "node-name": backend, "read-only": dev.readonly,
                                    "file": {"driver": "file", "filename": dev.path,
                                             "read-only": dev.readonly}})
            try:
                await mon.device_add("virtio-blk-pci", dev.id, drive=backend, bus=port)
            except KataColoError:
                with contextlib.suppress(KataColoError):
                    await mon.blockdev_del(backend)
                raise
            self._devices[dev.id] = _Plugged("block", port, backend)
        else:
            raise InvalidArgument(f"unsupported device type {type(dev).__name__}")

    async def remove_device(self, dev_id: str, timeout: float = 10.0) -> None:
        plugged = self._devices.get(dev_id)
        if plugged is None:
            raise NotFound(f"device {dev_id} is not attached")
        await self.monitor.device_del(dev_id, timeout=timeout)
        del self._devices[dev_id]
        if plugged.kind == "net":
            await self.monitor.netdev_del(plugged.backend)
        elif plugged.kind == "block":
            await self.monitor.blockdev_del(plugged.backend)

    async def balloon(self, target_bytes: int) -> None:
        cfg, _ = self._require_prepared()
        if not cfg.balloon:
            raise FailedPrecondition("VM has no balloon device")
        if target_bytes <= 0:
            raise InvalidArgument(f"balloon target must be > 0, not {target_bytes}")
        await self.monitor.balloon(target_bytes)

    async def balloon_info(self) -> BalloonInfo:
        cfg, _ = self._require_prepared()
        if not cfg.balloon:
            raise FailedPrecondition("VM has no balloon device")
        mon = self.monitor
        actual = await mon.query_balloon()
        if not self._stats_polling:
            await mon.qom_set("/machine/peripheral/balloon0", "guest-stats-polling-interval",
                              BALLOON_POLL_SECONDS)
            self._stats_polling = True
        stats: dict[str, int] = {}
        try:
            raw = await mon.qom_get("/machine/peripheral/balloon0", "guest-stats")
        except HypervisorError:
            raw = {}  # the guest has not reported yet
        for key, value in dict(raw.get("stats", {})).items():
            if 0 <= int(value) < _UNREPORTED:  # QEMU reports "no value" as -1 (as a u64)
                stats[str(key)] = int(value)
        return BalloonInfo(actual_bytes=actual, stats=stats)

    async def resize_memory(self, target_mib: int) -> int:
        """Grow by one pc-dimm (128 MiB aligned) or shrink by unplugging DIMMs added earlier
        (newest first, never below ``target_mib``). Returns the resulting size in MiB."""
        cfg, _ = self._require_prepared()
        if not self.capabilities().memory_hotplug:
            raise FailedPrecondition("memory hotplug not configured (max_memory_mib/memory_slots)")
        current = cfg.memory_mib + sum(size for _, size in self._dimms)
        if not cfg.memory_mib <= target_mib <= cfg.max_memory_mib:
            raise InvalidArgument(f"memory target {target_mib} MiB outside "
                                  f"{cfg.memory_mib}..{cfg.max_memory_mib}")
        mon = self.monitor
        if target_mib > current:
            if len(self._dimms) >= cfg.memory_slots:
                raise ResourceExhausted("all memory slots are in use")
            add = -(-(target_mib - current) // MEMORY_ALIGN_MIB) * MEMORY_ALIGN_MIB
            add = min(add, cfg.max_memory_mib - current)
            if add <= 0:
                return current
            n = len(self._dimms)
            while any(name == f"dimm{n}" for name, _ in self._dimms):
                n += 1
            await mon.object_add("memory-backend-ram", f"mem{n}", size=add << 20)
            try:
                await mon.device_add("pc-dimm", f"dimm{n}", memdev=f"mem{n}")
            except KataColoError:
                with contextlib.suppress(KataColoError):
                    await mon.object_del(f"mem{n}")
                raise
            self._dimms.append((f"dimm{n}", add))
            return current + add
        while self._dimms and current - self._dimms[-1][1] >= target_mib:
            name, size = self._dimms[-1]
            await mon.device_del(name)
            await mon.object_del("mem" + name[len("dimm"):])
            self._dimms.pop()
            current -= size
        return current

