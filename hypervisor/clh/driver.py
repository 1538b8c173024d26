"""CloudHypervisor: one cloud-hypervisor process per VM, driven over its REST API (registry
name ``clh``).

Files (all under ``cfg.state_dir``, see :class:`~hypervisor.clh.vmconfig.ClhPaths`):
clh-api.sock (the API), clh.sock (the hybrid vsock the agent is reached on), console.log (the
guest serial console), clh.log (the VMM's stdout/stderr), clh.pid (written right after the VMM
started) and, when this driver created the directory, a marker that lets :meth:`recover` remove
the whole directory from a fresh process.

Boot (kata's clh.go order): the VMM is started with ``--api-socket path=<state>/clh-api.sock``
→ ``vmm.ping`` until it answers (10 ms apart, up to kata's 10 s) → ``vm.create`` → ``vm.info``
must say Created → ``vm.add-net`` per NIC with its tap fds as SCM_RIGHTS → ``vm.boot`` →
``vm.info`` must say Running. Any failure kills the VMM and removes its files; a VMM that dies
during a call is reported with its exit status and log tail. Stop: ``vm.shutdown`` →
``vm.delete`` → ``vmm.shutdown`` → wait, then SIGTERM, SIGKILL.

Capabilities beyond the core: pause/resume, device hotplug and vCPU resize
(:mod:`~hypervisor.clh.devices`), memory control (:mod:`~hypervisor.clh.memory`), snapshot
(:meth:`CloudHypervisor.save`; :meth:`CloudHypervisor.restore` starts a VMM from one), guest
console, VMM counters. No shared filesystem: Cloud Hypervisor has no 9p.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from common.errors import (
    ConnectionClosed,
    DeadlineExceeded,
    FailedPrecondition,
    HypervisorError,
    InvalidArgument,
    KataColoError,
)
from hypervisor.base import AgentAddress, Capabilities, VcpuThreads, VmConfig
from hypervisor.clh import vmconfig
from hypervisor.clh.api import API_TIMEOUT, ClhApi
from hypervisor.clh.devices import DevicesMixin
from hypervisor.clh.memory import MemoryMixin
from hypervisor.clh.options import ClhOptions
from hypervisor.clh.vmconfig import ClhPaths
from hypervisor.vmm_process import pid_alive, tail

log = logging.getLogger(__name__)

T = TypeVar("T")
VMM_START_TIMEOUT = 10.0   # kata clhTimeout: the ping loop
PING_INTERVAL = 0.01       # kata: 10 ms between pings
EXIT_GRACE = 1.0           # how long a broken API connection waits for the reaper to see an exit
MAX_VCPU_THREADS = 1024
_VCPU_COMM = re.compile(r"vcpu(\d{1,4})")


def check_binary(path: str) -> None:
    """InvalidArgument naming ``path`` unless it is an executable file."""
    if not os.path.lexists(path):
        raise InvalidArgument(f"Cloud Hypervisor binary {path} does not exist "
                              "(install cloud-hypervisor or set [hypervisor.clh] path)")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise InvalidArgument(f"Cloud Hypervisor binary {path} is not an executable file")


class CloudHypervisor(DevicesMixin, MemoryMixin):
    """Implements hypervisor.base.Hypervisor (+ PauseResume, DeviceHotplug, MemoryControl,
    Snapshot, GuestConsole, VmmMetrics)."""

    name = "clh"
    Options = ClhOptions

    def __init__(self) -> None:
        self._cfg: VmConfig | None = None
        self._paths: ClhPaths | None = None
        self._argv: list[str] = []
        self._vm_json: dict[str, Any] = {}
        self._created_dir = False
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._api: ClhApi | None = None
        self._devices: dict[str, str] = {}   # device id → kind (net, block, vfio)
        self._vcpus = 0

    # -- accessors ----------------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def vm_json(self) -> dict[str, Any]:
        """The ``vm.create`` body built by :meth:`prepare`."""
        return json.loads(json.dumps(self._vm_json))

    @property
    def console_log_path(self) -> str | None:
        return self._paths.console_log if self._paths else None

    @property
    def api(self) -> ClhApi:
        if self._api is None or not self._running():
            raise FailedPrecondition("the VM is not running")
        return self._api

    def vmm_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def agent_address(self) -> AgentAddress:
        cfg, paths = self._require_prepared()
        return AgentAddress("hybrid-vsock", path=paths.vsock_socket, port=cfg.vsock_port)

    def capabilities(self) -> Capabilities:
        """Static facts; ``shared_fs`` is empty (no 9p), so a 9p share is refused up front."""
        return Capabilities(shared_fs=(), agent_transports=("hybrid-vsock",),
                            block_drivers=vmconfig.BLOCK_DRIVERS, hotplug=("net", "block", "vfio"),
                            multiqueue_net=True,
                            memory=self.memory_mechanisms() if self._cfg is not None else ())

    def _require_prepared(self) -> tuple[VmConfig, ClhPaths]:
        if self._cfg is None or self._paths is None:
            raise FailedPrecondition("hypervisor not prepared")
        return self._cfg, self._paths

    def record(self) -> dict[str, object]:
        _, paths = self._require_prepared()
        return {"state_dir": paths.state_dir, "pid": self.vmm_pid() or 0}

    def console_tail(self, limit: int = 4096) -> str:
        return tail(self._paths.console_log, limit) if self._paths is not None else ""

    # -- lifecycle ----------------------------------------------------------------------------

    async def prepare(self, cfg: VmConfig) -> None:
        if self._proc is not None:
            raise FailedPrecondition("VM already started")
        argv = vmconfig.build_argv(cfg)
        vm_json = vmconfig.build_vm_config(cfg)
        check_binary(cfg.hypervisor_path)
        paths = ClhPaths(cfg.state_dir)
        if not os.path.isdir(cfg.state_dir):
            os.makedirs(cfg.state_dir, mode=0o700)
            self._created_dir = True
            with open(paths.marker, "w", encoding="utf-8") as f:
                f.write(cfg.vm_id + "\n")
        elif os.path.lexists(paths.api_socket) or os.path.exists(paths.pidfile):
            raise FailedPrecondition(f"{cfg.state_dir} holds another VM's files; clean it up first")
        self._cfg, self._paths, self._argv, self._vm_json = cfg, paths, argv, vm_json
        self._vcpus = cfg.vcpus

    async def start(self, timeout: float) -> None:
        """Launch the VMM, create the VM, add its NICs and boot it (kata's order)."""
        cfg, _ = self._require_prepared()
        await self._run_boot(self._create_and_boot, timeout, "boot")
        log.info("cloud-hypervisor for %s up (pid %s)", cfg.vm_id, self.vmm_pid())

    async def restore(self, directory: str, timeout: float, resume: bool = True) -> None:
        """Instead of :meth:`start`: launch the VMM and restore the VM :meth:`save` wrote to
        ``directory`` (``vm.restore``; Running when ``resume``, else Paused). CH takes the VM's
        configuration (socket and console paths included) from the snapshot, so restore into
        the state dir it was taken from. NICs cannot be restored: their new tap fds need
        ``RestoreConfig.net_fds``, which openapi 0.3.0 does not define."""
        cfg, _ = self._require_prepared()
        snap_nets = _snapshot_nets(directory)
        if cfg.nics or snap_nets:
            raise InvalidArgument(f"cannot restore NICs {snap_nets or [n.id for n in cfg.nics]} "
                                  "(the API has no net_fds); attach them after the restore")
        await self._run_boot(lambda: self._restore(directory, resume), timeout, "restore")

    async def _run_boot(self, steps: Callable[[], Awaitable[None]], timeout: float, what: str) -> None:
        """Launch the VMM and run ``steps`` within ``timeout``; on any failure nothing stays."""
        if self._proc is not None:
            raise FailedPrecondition("VM already started")
        try:
            async with asyncio.timeout(timeout):
                await self._launch()
                await steps()
        except BaseException as exc:
            detail = self._failure_detail()
            await self._teardown_process(force=True, timeout=2.0)
            await self._discard_files()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(f"cloud-hypervisor {what} did not finish within {timeout:g}s{detail}") from None
            if isinstance(exc, KataColoError):
                exc.message = f"{exc.message}{detail}"
            raise

    async def _launch(self) -> None:
        cfg, paths = self._require_prepared()
        with open(paths.vmm_log, "ab") as vlog:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self._argv, stdin=asyncio.subprocess.DEVNULL, stdout=vlog, stderr=vlog,
                    start_new_session=True)
            except OSError as exc:
                raise HypervisorError(f"cannot execute {cfg.hypervisor_path}: {exc}") from None
        with open(paths.pidfile, "w", encoding="ascii") as f:
            f.write(f"{self._proc.pid}\n")
        self._exited = asyncio.get_running_loop().create_future()
        self._reaper = asyncio.create_task(self._reap(self._proc), name=f"clh-reaper {cfg.vm_id}")
        self._api = ClhApi(paths.api_socket)
        await self._wait_api()

    async def _wait_api(self) -> None:
        """``vmm.ping`` until the API answers (kata's waitVMM: 10 ms apart, up to 10 s)."""
        assert self._api is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VMM_START_TIMEOUT
        while True:
            if not self._running():
                raise HypervisorError(f"cloud-hypervisor exited with status {self._exit_status()} "
                                      "before its API answered")
            try:
                await self._api.ping(timeout=API_TIMEOUT)
                return
            except (ConnectionClosed, DeadlineExceeded) as exc:
                if loop.time() > deadline:
                    raise HypervisorError(f"cloud-hypervisor API did not answer within "
                                          f"{VMM_START_TIMEOUT:g}s: {exc}") from None
            await asyncio.sleep(PING_INTERVAL)

    async def _create_and_boot(self) -> None:
        cfg, _ = self._require_prepared()
        api = self.api
        await self._call("vm.create", api.create(self._vm_json))
        await self._expect_state("Created", "vm.create")
        for nic in cfg.nics:
            await self._call("vm.add-net", api.add_net(vmconfig.net_config(nic, cfg.vcpus), nic.tap_fds))
            self._devices[nic.id] = "net"
        await self._call("vm.boot", api.boot())
        await self._expect_state("Running", "vm.boot")

    async def _restore(self, directory: str, resume: bool) -> None:
        await self._call("vm.restore", self.api.restore(_file_url(directory), resume))
        info = await self._expect_state("Running" if resume else "Paused", "vm.restore")
        cpus = info.get("config", {}).get("cpus", {}) if isinstance(info.get("config"), dict) else {}
        if isinstance(cpus, dict) and isinstance(cpus.get("boot_vcpus"), int):
            self._vcpus = cpus["boot_vcpus"]

    async def _expect_state(self, want: str, after: str) -> dict[str, Any]:
        info = await self._call("vm.info", self.api.info())
        if info.get("state") != want:
            raise HypervisorError(f"VM state is {info.get('state')!r}, not {want!r}, after {after}")
        return info

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """Await an API call; a broken connection becomes "the VMM died" when it did."""
        try:
            return await call
        except ConnectionClosed as exc:
            await self._wait_exit(EXIT_GRACE)
            if not self._running():
                raise HypervisorError(f"cloud-hypervisor (pid {self.vmm_pid()}) exited with status "
                                      f"{self._exit_status()} during {what}") from None
            raise HypervisorError(f"cloud-hypervisor API connection lost during {what}: {exc}") from None

    def _failure_detail(self) -> str:
        if self._paths is None:
            return ""
        parts = []
        for label, path in (("cloud-hypervisor", self._paths.vmm_log), ("console", self._paths.console_log)):
            text = tail(path)
            if text:
                parts.append(f"\n--- {label} output (tail) ---\n{text}")
        return "".join(parts)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        log.info("cloud-hypervisor pid %d exited with %d", proc.pid, rc)
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(rc)

    def _exit_status(self) -> int | None:
        return self._exited.result() if self._exited is not None and self._exited.done() else None

    async def wait(self) -> int:
        if self._exited is None:
            raise FailedPrecondition("VM not started")
        return await asyncio.shield(self._exited)

    def _running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    async def stop(self, force: bool = False, timeout: float = 10.0) -> None:
        await self._teardown_process(force=force, timeout=timeout)

    async def _teardown_process(self, force: bool, timeout: float) -> None:
        """vm.shutdown → vm.delete → vmm.shutdown → wait → SIGTERM → SIGKILL; always reaps."""
        if self._running():
            assert self._proc is not None
            if not force and self._api is not None:
                await self._graceful(self._api, timeout)
            for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
                if not self._running():
                    break
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(sig)
                await self._wait_exit(grace)
            if self._running():
                raise HypervisorError(f"cloud-hypervisor pid {self._proc.pid} survived SIGKILL")
        if self._reaper is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper

    async def _graceful(self, api: ClhApi, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                for what, call in (("vm.shutdown", api.shutdown), ("vm.delete", api.delete),
                                   ("vmm.shutdown", api.shutdown_vmm)):
                    try:
                        await call()
                    except ConnectionClosed:
                        break
                    except KataColoError as exc:
                        log.info("cloud-hypervisor %s during stop: %s", what, exc)
                await self._wait_exit(timeout)
        except TimeoutError:
            log.warning("cloud-hypervisor did not stop within %gs", timeout)

    async def _wait_exit(self, timeout: float) -> None:
        if self._exited is None:
            return
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

    # -- capabilities -------------------------------------------------------------------------

    async def vcpu_threads(self) -> VcpuThreads:
        """{vCPU index: TID} from the VMM's threads named ``vcpu<N>`` (CH names them so)."""
        pid = self.vmm_pid()
        if pid is None or not self._running():
            raise FailedPrecondition("the VM is not running")
        threads: VcpuThreads = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError as exc:
            raise HypervisorError(f"cannot list the threads of cloud-hypervisor pid {pid}: {exc}") from None
        for tid in tids[:MAX_VCPU_THREADS * 4]:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                    m = _VCPU_COMM.fullmatch(f.read().strip())
            except OSError:
                continue  # the thread ended meanwhile
            if m is not None and tid.isdigit():
                threads[int(m.group(1))] = int(tid)
        if not threads:
            raise HypervisorError(f"cloud-hypervisor pid {pid} has no vcpu<N> threads")
        return threads

    async def pause(self) -> None:
        await self._call("vm.pause", self.api.pause())

    async def resume(self) -> None:
        await self._call("vm.resume", self.api.resume())

    async def status(self) -> str:
        return str((await self._call("vm.info", self.api.info())).get("state"))

    async def save(self, directory: str) -> None:
        """Pause (unless paused) and ``vm.snapshot`` into ``directory`` (created 0700 when
        absent): CH writes config.json, state.json and the guest memory. The VM stays paused."""
        if not os.path.isabs(directory):
            raise InvalidArgument(f"snapshot directory must be absolute, not {directory!r}")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if await self.status() != "Paused":
            await self.pause()
        await self._call("vm.snapshot", self.api.snapshot(_file_url(directory)))

    async def vmm_counters(self) -> dict[str, float]:
        """``vm.counters`` flattened to ``<device>.<counter>``."""
        raw = await self._call("vm.counters", self.api.counters())
        out: dict[str, float] = {}
        for device, counters in raw.items():
            if isinstance(counters, dict):
                for key, value in counters.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        out[f"{device}.{key}"] = float(value)
        return out

    # -- crash recovery -----------------------------------------------------------------------

    @staticmethod
    def remove_vm_files(state_dir: str, remove_dir: bool | None = None) -> None:
        """Remove the files a VM keeps in ``state_dir``; the directory itself when the driver
        created it (``remove_dir`` None = decide by the marker file)."""
        paths = ClhPaths(state_dir)
        if remove_dir is None:
            remove_dir = os.path.exists(paths.marker)
        if remove_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
            return
        for path in paths.files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @classmethod
    async def recover(cls, record: dict[str, object], timeout: float = 3.0) -> None:
        """Kill a leftover VMM of ``record`` (its state dir's pidfile, the recorded pid, or any
        process whose command line names this state dir's API socket: the VMM may have started
        before its pid was journaled) and remove its files. A pid is only killed when its
        command line names this API socket (pid reuse guard)."""
        state_dir = str(record.get("state_dir") or "")
        if not state_dir or not os.path.isabs(state_dir):
            return
        paths = ClhPaths(state_dir)
        try:
            with open(paths.pidfile, encoding="ascii") as f:
                pid = int(f.read().strip() or "0")
        except (OSError, ValueError):
            pid = 0
        try:
            extra = int(str(record.get("pid") or 0))
        except ValueError:
            extra = 0
        for candidate in {pid, extra, *cls._pids_naming(paths)} - {0}:
            await cls._kill_ours(candidate, paths, timeout)
        cls.remove_vm_files(state_dir)

    @staticmethod
    def _cmdline(pid: int) -> list[bytes]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")
        except OSError:
            return []

    @classmethod
    def is_our_vmm(cls, pid: int, paths: ClhPaths) -> bool:
        """True when ``pid``'s command line has ``--api-socket path=<this VM's socket>``."""
        args = cls._cmdline(pid)
        want = os.fsencode(paths.api_socket_arg)
        return any(a == b"--api-socket" and b == want for a, b in zip(args, args[1:]))

    @classmethod
    def _pids_naming(cls, paths: ClhPaths) -> list[int]:
        return [int(e) for e in os.listdir("/proc") if e.isdigit() and cls.is_our_vmm(int(e), paths)]

    @classmethod
    async def _kill_ours(cls, pid: int, paths: ClhPaths, timeout: float) -> None:
        if pid > 0 and pid_alive(pid) and cls.is_our_vmm(pid, paths):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while pid_alive(pid):
                if time.monotonic() > deadline:
                    raise HypervisorError(f"leftover cloud-hypervisor pid {pid} did not die")
                await asyncio.sleep(0.05)


def _file_url(directory: str) -> str:
    if not os.path.isabs(directory) or any(c in directory for c in "\0\n\r"):
        raise InvalidArgument(f"snapshot directory must be an absolute path, not {directory!r}")
    return "file://" + directory


def _snapshot_nets(directory: str) -> list[str]:
    """Ids of the NICs in a snapshot's config.json (InvalidArgument when it is not a snapshot)."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(4 << 20))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{directory} holds no cloud-hypervisor snapshot ({path}: {exc})") from None
    nets = config.get("net") if isinstance(config, dict) else None
    return [str(n.get("id", "?")) for n in nets if isinstance(n, dict)] if isinstance(nets, list) else []
