"""Sandbox lifecycle and failure paths with a fake hypervisor, fake agent and fake resources
(milliseconds): a boot failing at any step releases exactly what was made and leaves no journal;
at every step of a boot the journal alone lets a fresh process undo everything (the shim killed
there); VM death is noticed; stop failures are raised, never swallowed."""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import shim.resources
from common.errors import AgentError, ConfigError, FailedPrecondition, HypervisorError, ResourceError
from hypervisor import registry
from hypervisor.base import Capabilities
from shim.backend import BackendContext, CreateOpts, Stdio
from shim.resources.manager import JOURNAL
from shim.sandbox import sandbox as sandbox_mod
from shim.sandbox.sandbox import Sandbox, State
from tests.fakes.agent import FakeGuestAgent
from tests.fakes.hypervisor import MARKER, FakeHypervisor
from tests.fakes.resources import FakeResource, FakeShareFs, Recorder, resource_class

SANDBOX = "sb1"
CONFIG = """
[hypervisor.qemu]
default_vcpus = 2
[colo.priorities.high]
cpu_shares = 1024
[colo.priorities.low]
cpu_shares = 2
"""


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@dataclass
class Rig:
    tmp: Path
    hv: FakeHypervisor
    agent: FakeGuestAgent
    rec: Recorder
    classes: list[type[FakeResource]]
    config: Path
    sandbox: Sandbox = field(init=False)

    def __post_init__(self) -> None:
        self.sandbox = self.new_sandbox()

    @property
    def state(self) -> Path:
        return self.tmp / "sbs" / SANDBOX

    def new_sandbox(self) -> Sandbox:
        ctx = BackendContext("testns", SANDBOX, str(self.state), config_path=str(self.config))
        return Sandbox(ctx, hypervisor_factory=lambda name: self.hv, agent_factory=self.agent.factory)

    def opts(self, annotations: dict[str, str] | None = None, **spec: Any) -> CreateOpts:
        full = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "annotations": annotations or {}, **spec}
        return CreateOpts(id=SANDBOX, bundle=str(self.tmp / "bundle"), spec=full, stdio=Stdio(),
                          sandbox_id=SANDBOX)

    def resource(self, kind: str) -> FakeResource:
        cls = next(c for c in self.classes if c.kind == kind)
        assert len(cls.instances) == 1
        return cls.instances[0]

    def journal_kinds(self) -> list[str]:
        path = self.state / JOURNAL
        return [e["kind"] for e in json.loads(path.read_text())["entries"]] if path.exists() else []

    def journal_record(self, kind: str) -> dict[str, Any]:
        entries = json.loads((self.state / JOURNAL).read_text())["entries"]
        return next(e["record"] for e in entries if e["kind"] == kind)

    def leftovers(self) -> dict[str, Any]:
        """Everything a sandbox may make on the host, that is still there."""
        left: dict[str, Any] = {
            "objects": sorted(p.name for p in self.state.glob("*.obj")) if self.state.exists() else [],
            "vm dir": (self.state / "vm").exists(),
            "journal": (self.state / JOURNAL).exists(),
        }
        pid = self.hv.vmm_pid()
        left["vmm"] = pid is not None and self.hv._proc is not None and pid_alive(pid)
        return {k: v for k, v in left.items() if v}


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    rec = Recorder()
    classes = [resource_class("sharefs", rec, base=FakeShareFs), resource_class("net", rec),
               resource_class("qos", rec)]
    monkeypatch.setattr(shim.resources, "SANDBOX_RESOURCES", tuple(classes))
    monkeypatch.setitem(registry.DRIVERS, "fake", FakeHypervisor.REGISTRY_TARGET)
    monkeypatch.setattr(FakeHypervisor, "recovered", [])
    config = tmp_path / "configuration.toml"
    config.write_text(CONFIG)
    return Rig(tmp_path, FakeHypervisor(), FakeGuestAgent(), rec, classes, config)


# -- the good path ------------------------------------------------------------------------------

async def test_boot_and_stop(rig: Rig):
    sb = rig.sandbox
    await sb.start(rig.opts(hostname="pod-a"))
    assert sb.state is State.RUNNING and sb.running and sb.require_agent() is rig.agent
    assert rig.hv.calls == ["prepare", "start"]
    assert rig.agent.names() == ["connect", "create_sandbox"]
    assert rig.agent.sandbox == {"id": SANDBOX, "hostname": "pod-a", "storages": ["9p:kataShared"]}
    cfg = rig.hv.cfg
    assert cfg is not None and cfg.vm_id == SANDBOX and cfg.state_dir == str(rig.state / "vm")
    assert cfg.vcpus == 2
    assert cfg.kernel_params.endswith("fake.sharefs=1 fake.net=1 fake.qos=1")  # every patch, in order
    assert rig.rec.phases("after_boot") == ["sharefs", "net", "qos"]
    assert rig.journal_kinds() == ["sharefs", "net", "qos", "vm"]
    assert rig.journal_record("vm") == {"driver": "fake", "state_dir": str(rig.state / "vm"), "pid": 0}
    assert sb.resource("net") is rig.resource("net") and sb.resource("nothing") is None
    await sb.stop()
    assert sb.state is State.STOPPED and not sb.running
    assert rig.hv.calls[-2:] == ["stop", "cleanup"] and rig.agent.names()[-1] == "close"
    assert rig.rec.phases("teardown") == ["qos", "net", "sharefs"]
    assert rig.leftovers() == {}
    await sb.stop()  # idempotent
    assert rig.rec.phases("teardown") == ["qos", "net", "sharefs"]
    with pytest.raises(FailedPrecondition):
        sb.require_agent()


async def test_start_twice_is_refused(rig: Rig):
    await rig.sandbox.start(rig.opts())
    with pytest.raises(FailedPrecondition, match="running"):
        await rig.sandbox.start(rig.opts())
    await rig.sandbox.stop()


async def test_the_vm_record_is_journaled_before_the_vmm_starts(rig: Rig):
    seen: list[list[str]] = []
    rig.hv.hooks["start"] = lambda: seen.append(rig.journal_kinds())
    await rig.sandbox.start(rig.opts())
    assert seen == [["sharefs", "net", "qos", "vm"]]
    await rig.sandbox.stop()


async def test_annotations_reach_the_vm_config(rig: Rig):
    await rig.sandbox.start(rig.opts({"io.katacontainers.config.hypervisor.default_vcpus": "3"}))
    assert rig.hv.cfg is not None and rig.hv.cfg.vcpus == 3
    await rig.sandbox.stop()


# -- a boot failing at each step ---------------------------------------------------------------

def _fail_resource(kind: str, phase: str) -> Callable[[Rig], None]:
    def inject(rig: Rig) -> None:
        next(c for c in rig.classes if c.kind == kind).fail[phase] = ResourceError(f"{kind} {phase} failed")
    return inject


def _fail_hv(method: str, exc: BaseException | None = None) -> Callable[[Rig], None]:
    def inject(rig: Rig) -> None:
        rig.hv.fail[method] = exc or HypervisorError(f"{method} failed")
    return inject


def _fail_agent(method: str) -> Callable[[Rig], None]:
    def inject(rig: Rig) -> None:
        rig.agent.fail[method] = AgentError(f"{method} failed")
    return inject


def _bad_config(rig: Rig) -> None:
    rig.config.write_text("[hypervisor.qemu\n")


# step → (inject, exception type, kinds whose before_boot ran, VM prepared)
BOOT_STEPS: dict[str, tuple[Callable[[Rig], None], type[BaseException], list[str], bool]] = {
    "config load": (_bad_config, ConfigError, [], False),
    "sharefs for_sandbox": (_fail_resource("sharefs", "for_sandbox"), ResourceError, [], False),
    "qos for_sandbox": (_fail_resource("qos", "for_sandbox"), ResourceError, [], False),
    "sharefs before_boot": (_fail_resource("sharefs", "before_boot"), ResourceError, ["sharefs"], False),
    "net before_boot": (_fail_resource("net", "before_boot"), ResourceError, ["sharefs", "net"], False),
    "qos before_boot": (_fail_resource("qos", "before_boot"), ResourceError, ["sharefs", "net", "qos"], False),
    "hypervisor prepare": (_fail_hv("prepare"), HypervisorError, ["sharefs", "net", "qos"], False),
    "hypervisor start": (_fail_hv("start"), HypervisorError, ["sharefs", "net", "qos"], True),
    "hypervisor start (a bug)": (_fail_hv("start", ValueError("bug")), ValueError, ["sharefs", "net", "qos"],
                                 True),
    "agent connect": (_fail_agent("connect"), AgentError, ["sharefs", "net", "qos"], True),
    "create_sandbox": (_fail_agent("create_sandbox"), AgentError, ["sharefs", "net", "qos"], True),
    "sharefs after_boot": (_fail_resource("sharefs", "after_boot"), ResourceError, ["sharefs", "net", "qos"], True),
    "net after_boot": (_fail_resource("net", "after_boot"), ResourceError, ["sharefs", "net", "qos"], True),
    "qos after_boot": (_fail_resource("qos", "after_boot"), ResourceError, ["sharefs", "net", "qos"], True),
}


@pytest.mark.parametrize("step", list(BOOT_STEPS))
async def test_boot_failing_at_each_step_releases_everything(rig: Rig, step: str):
    inject, exc_type, acted, prepared = BOOT_STEPS[step]
    inject(rig)
    with pytest.raises(exc_type):
        await rig.sandbox.start(rig.opts())
    assert rig.sandbox.state is State.STOPPED
    assert rig.rec.phases("before_boot") == acted
    assert rig.rec.phases("teardown") == list(reversed(acted))  # everything journaled, newest first
    assert rig.leftovers() == {}
    if prepared:
        assert rig.hv.calls[-1] == "cleanup" and "prepare" in rig.hv.calls
    if "connect" in rig.agent.names():
        assert rig.agent.names()[-1] == "close"
    if step == "config load":
        assert rig.hv.calls == [] and not rig.state.exists()


async def test_vm_dying_while_the_agent_connects(rig: Rig):
    rig.agent.connect_hangs = True
    rig.agent.hooks["connect"] = lambda: asyncio.get_running_loop().call_later(0.01, rig.hv.die, 1)
    with pytest.raises(AgentError, match="VM exited before its agent answered"):
        await rig.sandbox.start(rig.opts())
    assert rig.sandbox.vm_exit_status == 1
    assert rig.leftovers() == {}


async def test_cleanup_failing_after_a_failed_boot_keeps_the_boot_error(rig: Rig):
    rig.hv.fail["start"] = HypervisorError("qemu: cannot open kernel")
    next(c for c in rig.classes if c.kind == "net").fail["teardown"] = ResourceError("tap busy")
    with pytest.raises(HypervisorError, match="cannot open kernel") as err:
        await rig.sandbox.start(rig.opts())
    assert any("tap busy" in note for note in getattr(err.value, "__notes__", []))
    assert rig.journal_kinds() == ["net"]                  # what could not be released stays journaled
    assert rig.rec.phases("teardown") == ["qos", "net", "sharefs"]


async def test_unsupported_shared_fs_is_refused_before_anything_is_made(rig: Rig, monkeypatch):
    from shim.resources.sharefs import ShareFsResource
    monkeypatch.setattr(shim.resources, "SANDBOX_RESOURCES", (rig.classes[1], ShareFsResource))
    rig.hv._caps = Capabilities(shared_fs=())
    with pytest.raises(Exception, match="no virtio-9p"):
        await rig.sandbox.start(rig.opts())
    assert rig.rec.phases("before_boot") == [] and rig.leftovers() == {}


# -- stop failures -------------------------------------------------------------------------------

async def test_stop_kills_a_vm_that_does_not_stop(rig: Rig):
    await rig.sandbox.start(rig.opts())
    rig.hv.fail["stop"] = HypervisorError("quit timed out")
    await rig.sandbox.stop()
    assert rig.hv.calls[-2:] == ["stop", "cleanup"]
    assert rig.leftovers() == {}


async def test_a_vmm_that_survives_is_raised_and_stays_journaled_for_delete(rig: Rig):
    await rig.sandbox.start(rig.opts())
    rig.hv.fail["cleanup"] = HypervisorError("qemu pid 42 survived SIGKILL")
    with pytest.raises(HypervisorError, match="survived"):
        await rig.sandbox.stop()
    assert rig.sandbox.state is State.STOPPED
    assert rig.journal_kinds() == ["sharefs", "net", "qos", "vm"]
    # containerd's delete (a fresh process) then releases everything from the journal
    await sandbox_mod.recover(rig.state)
    assert FakeHypervisor.recovered and rig.leftovers() == {}
    assert [r["path"] for c in rig.classes for r in c.recovered] == [
        str(rig.state / f"{k}.obj") for k in ("sharefs", "net", "qos")]


async def test_a_resource_teardown_failure_is_raised(rig: Rig):
    await rig.sandbox.start(rig.opts())
    next(c for c in rig.classes if c.kind == "net").fail["teardown"] = ResourceError("tap busy")
    with pytest.raises(ResourceError, match="net: tap busy"):
        await rig.sandbox.stop()
    assert rig.journal_kinds() == ["net"]
    assert not (rig.state / "vm").exists()


# -- the VM dying on its own ------------------------------------------------------------------

async def test_vm_death_is_noticed(rig: Rig):
    await rig.sandbox.start(rig.opts())
    rig.hv.die(-9)
    await asyncio.wait_for(rig.sandbox.vm_gone.wait(), 1)
    assert rig.sandbox.vm_exit_status == -9 and not rig.sandbox.running
    with pytest.raises(FailedPrecondition, match="not running"):
        rig.sandbox.require_agent()
    await rig.sandbox.stop()
    assert rig.leftovers() == {}


# -- the shim killed at each step: the journal alone undoes the boot ---------------------------

KILL_POINTS = ["net before_boot", "qos before_boot", "hypervisor prepare", "hypervisor start",
               "agent connect", "create_sandbox", "qos after_boot"]


@pytest.mark.parametrize("point", KILL_POINTS)
async def test_journal_at_each_boot_step_is_enough_to_recover(rig: Rig, point: str):
    """At ``point`` the boot is frozen and a fresh "delete" recovers from the journal alone;
    afterwards nothing made so far may remain (the shim was killed there)."""
    rig.hv = FakeHypervisor(vmm_process=True)
    rig.sandbox = rig.new_sandbox()
    snapshot: dict[str, Any] = {}

    class Killed(BaseException):
        pass

    async def crash_here(*_: Any) -> None:
        snapshot["objects"] = sorted(p.name for p in rig.state.glob("*.obj"))
        snapshot["vmm"] = rig.hv.vmm_pid()
        await sandbox_mod.recover(rig.state)        # what `containerd-shim delete` runs
        snapshot["after"] = rig.leftovers()
        raise Killed

    kind, _, phase = point.partition(" ")
    if kind == "hypervisor":
        rig.hv.hooks[phase] = crash_here
    elif kind in ("agent", "create_sandbox"):
        rig.agent.hooks["connect" if kind == "agent" else "create_sandbox"] = crash_here
    else:
        next(c for c in rig.classes if c.kind == kind).hooks[phase] = crash_here
    with pytest.raises(Killed):
        await rig.sandbox.start(rig.opts())
    assert snapshot["after"] == {}, f"left after recovery at {point}: {snapshot}"
    if point in ("agent connect", "create_sandbox", "qos after_boot"):
        assert snapshot["vmm"] is not None                  # a live VMM was there to kill
    assert "sharefs.obj" in snapshot["objects"]              # and objects to remove


async def test_recover_kills_the_vmm_of_a_killed_shim(rig: Rig):
    rig.hv = FakeHypervisor(vmm_process=True)
    sb = rig.new_sandbox()
    await sb.start(rig.opts())
    pid = rig.hv.vmm_pid()
    assert pid is not None and pid_alive(pid)
    assert rig.journal_record("vm")["pid"] == pid
    del sb  # kill -9: no stop, the journal and the VMM remain
    await sandbox_mod.recover(rig.state)
    for _ in range(100):
        if not pid_alive(pid):
            break
        await asyncio.sleep(0.01)
    assert not pid_alive(pid)
    assert rig.leftovers() == {} and not os.path.exists(rig.state / "vm" / MARKER)
    assert rig.journal_kinds() == []
