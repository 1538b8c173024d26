"""VM templating and hand-over for QEMU (the :class:`hypervisor.base.Snapshot` and
:class:`hypervisor.base.HandOver` capabilities).

- **save**: the VM's RAM is a shared ``memory-backend-file`` (``VmConfig.memory_file`` with
  ``memory_shared``), so only device state is written: ``stop``, migration capability
  ``x-ignore-shared`` (RAM blocks backed by a shared file are skipped), ``migrate
  exec:cat > <dir>/state``, then ``query-migrate`` until ``completed``. QEMU refuses while a
  9p export is mounted in the guest (a migration blocker): a template is saved before any
  CreateSandbox.
- **restore**: the clone's argv is the template's with the same memory file mapped private
  (copy-on-write) plus ``-incoming defer``; then the same capability and ``migrate-incoming
  exec:cat <dir>/state``. The VM comes back paused (the source was) and is resumed unless the
  caller asks otherwise (the cache keeps it paused). Device ids, PCI layout and machine options must equal the
  template's — the factory (:mod:`shim.factory`) keys templates by them.
- **release / adopt**: a process that did not start the QEMU (a shim taking a VM from the
  pre-booted cache) verifies the recorded pid is a live QEMU whose argv names this VM's pidfile,
  holds a pidfd on it (:class:`AdoptedProcess`: exit without waitpid, signals without pid reuse
  races) and connects to its QMP socket. The releasing side only closes its QMP connection.

Paths in ``exec:`` URIs go through ``shlex.quote`` (QEMU runs them with ``/bin/sh -c``).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shlex
import signal
from typing import Any

from common.errors import ConnectionClosed, DeadlineExceeded, FailedPrecondition, HypervisorError, InvalidArgument
from hypervisor.base import VmConfig, vm_config_from_dict
from hypervisor.qemu.cmdline import VmPaths
from hypervisor.qemu.monitor import QmpMonitor
from hypervisor.qemu.options import QemuOptions

STATE_FILE = "state"
EXIT_NOT_CHILD = 255
MIGRATION_POLL = 0.01
_CAPABILITY = [{"capability": "x-ignore-shared", "state": True}]


class AdoptedProcess:
    """A running process this one did not start, watched through a pidfd (Linux ≥ 5.3).

    Quacks like the parts of ``asyncio.subprocess.Process`` the driver uses: ``pid``,
    ``send_signal`` and ``wait`` (which returns :data:`EXIT_NOT_CHILD`: only the parent can
    read the real status)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except OSError as exc:
            raise HypervisorError(f"cannot watch pid {pid}: {exc.strerror}") from None

    def exited(self) -> bool:
        """True once the process has exited (its pidfd is readable)."""
        if self._fd < 0:
            return True
        readable, _, _ = select.select([self._fd], [], [], 0)
        return bool(readable)

    def send_signal(self, sig: int) -> None:
        if self._fd < 0:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._fd, sig)

    async def wait(self) -> int:
        if self._fd >= 0:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not done.done():
                    done.set_result(None)

            loop.add_reader(self._fd, readable)
            try:
                await done
            finally:
                loop.remove_reader(self._fd)
                os.close(self._fd)
                self._fd = -1
        self.returncode = EXIT_NOT_CHILD
        return EXIT_NOT_CHILD

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def exec_out(path: str) -> str:
    return f"exec:cat > {shlex.quote(path)}"


def exec_in(path: str) -> str:
    return f"exec:cat {shlex.quote(path)}"


async def wait_migration(mon: QmpMonitor, timeout: float, what: str) -> dict[str, Any]:
    """Poll ``query-migrate`` until completed (its info) or failed/cancelled (HypervisorError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = dict(await mon.execute("query-migrate"))
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise HypervisorError(f"{what} {status}: {info.get('error-desc', 'no detail')}")
        if loop.time() > deadline:
            raise DeadlineExceeded(f"{what} not done after {timeout:.1f}s (status {status})")
        await asyncio.sleep(MIGRATION_POLL)


class SnapshotMixin:
    """save / restore / release / adopt; needs the driver's process and QMP plumbing."""

    _cfg: VmConfig | None
    _paths: VmPaths | None
    _argv: list[str]
    _created_dir: bool
    _released: bool

    @property
    def monitor(self) -> QmpMonitor:  # provided by the driver
        raise NotImplementedError

    def _require_prepared(self) -> tuple[VmConfig, VmPaths]:  # provided by the driver
        raise NotImplementedError

    def _incoming_argv(self) -> list[str]:  # provided by the driver
        raise NotImplementedError

    async def _launch(self, argv: list[str], timeout: float, ready: Any) -> None:  # driver
        raise NotImplementedError

    async def _attach(self, proc: AdoptedProcess, timeout: float) -> None:  # driver
        raise NotImplementedError

    def record(self) -> dict[str, Any]:  # provided by the driver
        raise NotImplementedError

    async def save(self, directory: str, timeout: float = 60.0) -> None:
        cfg, _ = self._require_prepared()
        if not (cfg.memory_file and cfg.memory_shared):
            raise FailedPrecondition("only a VM whose RAM is a shared memory file can be saved "
                                     "(its RAM stays in the file)")
        if not os.path.isdir(directory):
            raise InvalidArgument(f"snapshot directory {directory} does not exist")
        mon = self.monitor
        await mon.stop()
        await mon.execute("migrate-set-capabilities", {"capabilities": _CAPABILITY})
        await mon.execute("migrate", {"uri": exec_out(os.path.join(directory, STATE_FILE))})
        await wait_migration(mon, timeout, "saving the VM state")

    async def restore(self, directory: str, timeout: float, resume: bool = True) -> None:
        cfg, _ = self._require_prepared()
        if not cfg.memory_file or cfg.memory_shared:
            raise FailedPrecondition("a clone maps the template's memory file private (memory_shared=False)")
        state = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(state) or not os.path.isfile(cfg.memory_file):
            raise FailedPrecondition(f"no saved VM in {directory} (state or memory file missing)")

        async def incoming(mon: QmpMonitor, remaining: float) -> None:
            await mon.execute("migrate-set-capabilities", {"capabilities": _CAPABILITY})
            await mon.execute("migrate-incoming", {"uri": exec_in(state)})
            try:
                await wait_migration(mon, remaining, f"restoring the VM from {directory}")
            except ConnectionClosed:  # QEMU exits when the incoming state does not load
                raise HypervisorError(f"restoring the VM from {directory} failed: QEMU exited") from None
            status = await mon.query_status()
            if resume and not status.get("running"):
                await mon.cont()
            elif not resume and status.get("running"):  # the template was saved paused
                await mon.stop()

        await self._launch(self._incoming_argv(), timeout, incoming)

    async def release(self) -> dict[str, Any]:
        record = self.record()
        if not record.get("pid"):
            raise FailedPrecondition("the VM is not running")
        self._released = True  # stop/cleanup no longer touch the VMM or its files
        mon = getattr(self, "_monitor", None)
        if mon is not None:
            await mon.close()
        return record

    async def adopt(self, record: dict[str, Any], timeout: float) -> None:
        if self._cfg is not None:
            raise FailedPrecondition("this driver already has a VM")
        try:
            cfg = vm_config_from_dict(dict(record["config"]), QemuOptions)
            pid = int(record["pid"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad VM record: {exc}") from None
        if str(record.get("state_dir")) != cfg.state_dir:
            raise InvalidArgument("bad VM record: state_dir differs from its config")
        paths = VmPaths(cfg.state_dir)
        proc = AdoptedProcess(pid)
        try:
            # checked after the pidfd is open: the fd pins this very process from here on
            if proc.exited() or not _names_pidfile(pid, paths):
                raise HypervisorError(f"pid {pid} is not the QEMU of VM {cfg.vm_id}")
            self._cfg, self._paths, self._argv = cfg, paths, _cmdline(pid)
            self._created_dir = os.path.exists(paths.marker)
            await self._attach(proc, timeout)
        except BaseException:
            proc.close()
            self._cfg = self._paths = None
            raise


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _names_pidfile(pid: int, paths: VmPaths) -> bool:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.fsencode(paths.pidfile) in f.read().split(b"\0")
    return False
