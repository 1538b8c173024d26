"""The sandbox with its REAL resources (the 9p share's directories, the pod network's tap and tc
filters in a real netns, the QoS cgroups in every hierarchy) and a fake hypervisor whose VMM is
a real child process with one thread per vCPU: a boot, a failed boot, and the shim "killed" at
several points of the boot (the journal alone must undo everything). Root; well under a second
per test."""
from __future__ import annotations

import asyncio
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import AgentError
from common.mount import mounts_under
from hypervisor import registry
from shim.backend import BackendContext, CreateOpts, Stdio
from shim.resources.manager import JOURNAL
from shim.resources.qos import detect_driver
from shim.sandbox import sandbox as sandbox_mod
from shim.sandbox.sandbox import Sandbox
from tests.fakes.agent import FakeGuestAgent
from tests.fakes.hypervisor import FakeHypervisor
from tests.support import netns as nsu
from tests.support.cgroups import groups_named, sweep

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, tap, cgroups, mounts)"),
              pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")]

SANDBOX = "sbreal"
TAP = "tap0_kata"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


class Env:
    def __init__(self, tmp: Path, ns: str, cgroup_root: str) -> None:
        self.tmp, self.ns, self.cgroup_root = tmp, ns, cgroup_root
        self.state = tmp / "sbs" / SANDBOX
        self.config = tmp / "configuration.toml"
        self.config.write_text(f"""
[hypervisor.qemu]
default_vcpus = 2
[colo]
cgroup_root = "{cgroup_root}"
[colo.priorities.high]
cpu_shares = 1024
[colo.priorities.low]
cpu_shares = 2
""")
        self.hv = FakeHypervisor(vmm_process=True)
        self.agent = FakeGuestAgent()

    def sandbox(self) -> Sandbox:
        ctx = BackendContext("testns", SANDBOX, str(self.state), config_path=str(self.config))
        return Sandbox(ctx, hypervisor_factory=lambda name: self.hv, agent_factory=self.agent.factory)

    def opts(self) -> CreateOpts:
        spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"]},
                "annotations": {"io.katacontainers.colo.vcpu-priorities": "high:1,low:1"},
                "linux": {"namespaces": [{"type": "network", "path": nsu.netns_path(self.ns)}]}}
        return CreateOpts(id=SANDBOX, bundle=str(self.tmp), spec=spec, stdio=Stdio(), sandbox_id=SANDBOX)

    def made(self) -> dict[str, Any]:
        """The host objects of this sandbox that exist now."""
        tc = nsu.tc_leftovers(self.ns)
        pid = self.hv.vmm_pid()
        left = {
            "tap": TAP in nsu.links(self.ns),
            "ingress qdisc": tc["ingress qdisc"], "filters": tc["filters"],
            "cgroups": groups_named(f"{self.cgroup_root}/{SANDBOX}"),
            "mounts": mounts_under(self.state) if self.state.exists() else [],
            "share": (self.state / "shared").exists(),
            "vm dir": (self.state / "vm").exists(),
            "journal": (self.state / JOURNAL).exists(),
            "vmm": pid is not None and pid_alive(pid),
        }
        return {k: v for k, v in left.items() if v}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setitem(registry.DRIVERS, "fake", FakeHypervisor.REGISTRY_TARGET)
    ns = nsu.unique_name("kc-sbx")
    root = f"kata-colo-test-{secrets.token_hex(3)}"
    with nsu.cni_netns(ns):
        e = Env(tmp_path, ns, root)
        try:
            yield e
        finally:
            sweep(detect_driver(), root)
            assert not groups_named(root)


async def test_boot_makes_everything_and_stop_releases_it(env: Env):
    before = nsu.snapshot(env.ns)
    sb = env.sandbox()
    await sb.start(env.opts())
    try:
        made = env.made()
        assert made.keys() == {"tap", "ingress qdisc", "filters", "cgroups", "share", "vm dir", "journal", "vmm"}
        assert "mirred" in made["filters"]
        # the VMM and its vCPU threads are where the annotation says
        threads = await env.hv.vcpu_threads()
        groups = {tid: Path(f"/proc/{env.hv.vmm_pid()}/task/{tid}/cgroup").read_text() for tid in threads.values()}
        assert f"{env.cgroup_root}/{SANDBOX}/vcpu-high" in groups[threads[0]]
        assert f"{env.cgroup_root}/{SANDBOX}/vcpu-low" in groups[threads[1]]
        assert env.agent.vcpu_priorities == {"high": [0], "low": [1]}
        ifaces, routes, _ = env.agent.network or ([], [], [])
        assert [i["name"] for i in ifaces] == ["eth0"] and routes
        # the share is private to root
        for p in (env.state, env.state / "shared"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o700
        cfg = env.hv.cfg
        eth0_mac = nsu.ns_sh(env.ns, "cat", "/sys/class/net/eth0/address").strip()
        assert cfg is not None and [(n.mac, len(n.tap_fds)) for n in cfg.nics] == [(eth0_mac, 2)]  # 2 vCPUs
        assert [d.host_path for d in cfg.shared_dirs] == [str(env.state / "shared")]
    finally:
        await sb.stop()
    assert env.made() == {}
    assert nsu.snapshot(env.ns) == before


async def test_failed_boot_releases_the_real_resources(env: Env):
    env.agent.fail["set_vcpu_priorities"] = AgentError("guest cannot make cpusets")
    with pytest.raises(AgentError):
        await env.sandbox().start(env.opts())
    assert env.made() == {}


@pytest.mark.parametrize("point", ["prepare", "start", "connect", "set_vcpu_priorities"])
async def test_kill_during_boot_then_recover_from_the_journal(env: Env, point: str):
    """The boot freezes at ``point``; a fresh `delete` recovers from the journal alone, then the
    "killed" shim's boot is abandoned. What existed at that moment is asserted, so the test
    cannot pass without exercising the point."""
    at_kill: dict[str, Any] = {}

    class Killed(BaseException):
        pass

    async def crash() -> None:
        at_kill.update(env.made())
        await sandbox_mod.recover(env.state)
        at_kill["after"] = env.made()
        raise Killed

    if point in ("prepare", "start"):
        env.hv.hooks[point] = crash
    else:
        env.agent.hooks[point] = crash
    with pytest.raises(Killed):
        await env.sandbox().start(env.opts())
    assert at_kill["after"] == {}, at_kill
    assert {"tap", "filters", "share", "journal"} <= at_kill.keys()
    if point != "prepare":
        assert "vm dir" in at_kill
    if point in ("connect", "set_vcpu_priorities"):
        assert "vmm" in at_kill
    if point == "set_vcpu_priorities":
        assert len(at_kill["cgroups"]) >= 2  # cpu and cpuset (v1) at least


async def test_recover_after_a_killed_running_sandbox(env: Env):
    sb = env.sandbox()
    await sb.start(env.opts())
    pid = env.hv.vmm_pid()
    assert pid is not None and env.made().keys() >= {"tap", "cgroups", "vmm"}
    del sb  # kill -9 of the shim: nothing runs, the VMM and every host object remain
    await sandbox_mod.recover(env.state)
    for _ in range(100):
        if not pid_alive(pid):
            break
        await asyncio.sleep(0.01)
    assert env.made() == {}
