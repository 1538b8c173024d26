"""TEST-ONLY :class:`hypervisor.base.Hypervisor` (+ PauseResume, GuestConsole) with failure
injection, for the sandbox's failure paths in milliseconds.

* Every method appends its name to :attr:`FakeHypervisor.calls`, then runs the test's hook
  (``hooks[name]``, sync or async: assert what the journal holds at that moment) and raises
  ``fail[name]`` when the test put an exception there (it stays until the test removes it).
* ``prepare`` creates ``cfg.state_dir`` with a marker file (the driver's own files, like QEMU's);
  ``cleanup`` and :meth:`FakeHypervisor.recover` remove it, so a test sees whether the VM's files
  were released.
* The VMM: by default no process (``vmm_pid()`` None unless ``pid=`` is given) and fake vCPU
  TIDs. With ``vmm_process=True`` ``start`` spawns a real child process with one thread per
  vCPU, so ``vmm_pid``/``vcpu_threads`` name real host threads the real QoS resource can place
  in cgroups; ``vcpu_tids=`` returns the test's own thread ids instead.
* :meth:`die` makes the VM exit on its own (``wait()`` resolves with ``rc``; the child, if
  any, is SIGKILLed), as QEMU crashing does.

Registry name ``fake``: a test that recovers a journal with a VM entry registers it with
``monkeypatch.setitem(hypervisor.registry.DRIVERS, "fake", FakeHypervisor.REGISTRY_TARGET)``.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from common.errors import FailedPrecondition, HypervisorError
from hypervisor.base import AgentAddress, Capabilities, VcpuThreads, VmConfig

MARKER = "fake-vm"
VMM_TAG = "kata-colo-fake-vmm"
FAKE_TID_BASE = 4_000_000  # above any pid_max this test machine uses: never a real thread

# A stand-in VMM: one sleeping thread per vCPU; prints the vCPU TIDs, then waits to be killed.
_VMM_CODE = """
import sys, threading, time
n = int(sys.argv[1])
tids, ready = [], threading.Barrier(n + 1)
def vcpu():
    tids.append(threading.get_native_id()); ready.wait(); time.sleep(1e6)
for _ in range(n):
    threading.Thread(target=vcpu, daemon=True).start()
ready.wait()
print(" ".join(map(str, tids)), flush=True)
time.sleep(1e6)
"""


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Any thread of ``pid`` not yet dead (a zombie leader's threads may still be exiting)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    return True
        except (OSError, IndexError):
            continue
    return False


class FakeHypervisor:
    name: ClassVar[str] = "fake"
    REGISTRY_TARGET: ClassVar[str] = "tests.fakes.hypervisor:FakeHypervisor"
    #: records :meth:`recover` was called with (class-wide: recovery runs without an instance)
    recovered: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, *, vcpus: int | None = None, fail: dict[str, BaseException] | None = None,
                 vmm_process: bool = False, vcpu_tids: VcpuThreads | None = None, pid: int | None = None,
                 console: str = "", capabilities: Capabilities | None = None) -> None:
        self.fail: dict[str, BaseException] = dict(fail or {})
        self.hooks: dict[str, Callable[[], Any]] = {}
        self.calls: list[str] = []
        self.cfg: VmConfig | None = None
        self.console = console
        self.paused = False
        self._vcpus = vcpus
        self._vmm_process = vmm_process
        self._vcpu_tids = dict(vcpu_tids) if vcpu_tids is not None else None
        self._pid = pid
        self._caps = capabilities or Capabilities(shared_fs=("virtio-9p",), agent_transports=("virtio-serial",),
                                                  multiqueue_net=True)
        self._proc: asyncio.subprocess.Process | None = None
        self._child_tids: list[int] = []
        self._exited: asyncio.Future[int] | None = None
        self._reaper: asyncio.Task[None] | None = None

    # -- injection ----------------------------------------------------------------------------

    async def _enter(self, method: str) -> None:
        self.calls.append(method)
        hook = self.hooks.get(method)
        if hook is not None:
            result = hook()
            if inspect.isawaitable(result):
                await result
        exc = self.fail.get(method)
        if exc is not None:
            raise exc

    def _enter_sync(self, method: str) -> None:
        self.calls.append(method)
        hook = self.hooks.get(method)
        if hook is not None:
            hook()
        exc = self.fail.get(method)
        if exc is not None:
            raise exc

    def die(self, rc: int = -signal.SIGKILL) -> None:
        """The VMM exits on its own (a crash): ``wait()`` resolves with ``rc``."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(rc)

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    # -- the core protocol --------------------------------------------------------------------

    def _require_prepared(self) -> VmConfig:
        if self.cfg is None:
            raise FailedPrecondition("hypervisor not prepared")
        return self.cfg

    async def prepare(self, cfg: VmConfig) -> None:
        await self._enter("prepare")
        if self._exited is not None:
            raise FailedPrecondition("VM already started")
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        Path(cfg.state_dir, MARKER).write_text(cfg.vm_id + "\n")
        self.cfg = cfg

    async def start(self, timeout: float) -> None:
        cfg = self._require_prepared()
        await self._enter("start")
        if self._exited is not None:
            raise FailedPrecondition("VM already started")
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        if self._vmm_process:
            n = self._vcpus or cfg.vcpus
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _VMM_CODE, str(n), VMM_TAG, cfg.state_dir,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
            assert self._proc.stdout is not None
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
            self._child_tids = [int(t) for t in line.split()]
            self._reaper = loop.create_task(self._reap(self._proc))
        Path(cfg.state_dir, "vmm.pid").write_text(f"{self.vmm_pid() or 0}\n")

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(rc)

    async def stop(self, force: bool = False, timeout: float = 10.0) -> None:
        await self._enter("stop")
        await self._end_vmm(0)

    async def _end_vmm(self, rc: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        if self._reaper is not None:
            with contextlib.suppress(BaseException):
                await self._reaper
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(rc)

    async def wait(self) -> int:
        if self._exited is None:
            raise FailedPrecondition("VM not started")
        return await asyncio.shield(self._exited)

    def agent_address(self) -> AgentAddress:
        cfg = self._require_prepared()
        return AgentAddress("virtio-serial", path=str(Path(cfg.state_dir) / "agent.sock"))

    async def vcpu_threads(self) -> VcpuThreads:
        cfg = self._require_prepared()
        await self._enter("vcpu_threads")
        if self._vcpu_tids is not None:
            return dict(self._vcpu_tids)
        if self._proc is not None:
            return dict(enumerate(self._child_tids))
        return {i: FAKE_TID_BASE + i for i in range(self._vcpus or cfg.vcpus)}

    def vmm_pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return self._pid if self._exited is not None else None

    def capabilities(self) -> Capabilities:
        return self._caps

    def record(self) -> dict[str, Any]:
        cfg = self._require_prepared()
        return {"state_dir": cfg.state_dir, "pid": self.vmm_pid() or 0}

    async def cleanup(self) -> None:
        await self._enter("cleanup")
        await self._end_vmm(-signal.SIGKILL)
        if self.cfg is not None:
            shutil.rmtree(self.cfg.state_dir, ignore_errors=True)

    @classmethod
    async def recover(cls, record: dict[str, Any], timeout: float = 3.0) -> None:
        cls.recovered.append(dict(record))
        state_dir = str(record.get("state_dir") or "")
        pid = int(record.get("pid") or 0)
        if pid > 0 and os.fsencode(VMM_TAG) in _cmdline(pid) and os.fsencode(state_dir) in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # like QEMU's recover: return once it is dead (its threads out of every cgroup)
            deadline = asyncio.get_running_loop().time() + timeout
            while _alive(pid):
                if asyncio.get_running_loop().time() > deadline:
                    raise HypervisorError(f"leftover fake VMM pid {pid} did not die")
                await asyncio.sleep(0.01)
        if state_dir and os.path.exists(os.path.join(state_dir, MARKER)):
            shutil.rmtree(state_dir, ignore_errors=True)

    # -- capabilities -------------------------------------------------------------------------

    async def pause(self) -> None:
        await self._enter("pause")
        if not self.running:
            raise HypervisorError("the VM is not running")
        self.paused = True

    async def resume(self) -> None:
        await self._enter("resume")
        self.paused = False

    def console_tail(self, limit: int = 4096) -> str:
        self._enter_sync("console_tail")
        return self.console[-limit:]
