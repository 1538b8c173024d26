"""VM templating on real QEMU (TCG) with the built guest image: the template is built once for
the module (a ~6 s boot), then clones start from it in a fraction of a second.

- two clones started at once are different machines: different /dev/urandom bytes, hostnames,
  and a guest clock within 1 s of the host's after the identity reset;
- a clone released by one driver instance is adopted by another (the cache hand-over), runs a
  container, and crash recovery from its journal record kills it and removes its files;
- a truncated device state makes QEMU's restore fail and leaves no process or file;
- ``destroy`` while clones run: the tmpfs is gone, the clones keep running.

Needs the agent with ReseedRandomDev/SetGuestDateTime: run with KATA_COLO_CONFIG pointing at a
configuration whose image has them (vm-images/build.py of this tree).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agent_api.client.convert import ninep_storage
from agent_api.client.facade import GuestAgent
from common.errors import HypervisorError
from common.guest_paths import GUEST_SHARED_DIR, SHARE_TAG
from common.mount import is_mountpoint
from hypervisor.base import SharedDir
from hypervisor.qemu.driver import QemuHypervisor
from shim import config as cfgmod
from shim.factory import vmdir
from shim.factory.factory import TEMPLATE, VmFactory, node_vm_config, prepare_template
from shim.factory.template import Template
from shim.sandbox.vmconfig import vm_config
from tests.support.agent import build_rootfs, make_spec, read_all

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]


def _config() -> cfgmod.Config:
    cfg = cfgmod.load()
    if not Path(cfg.hypervisor.kernel).exists():
        pytest.skip("guest image not built")
    tmpl = Path(tempfile.mkdtemp(prefix="kc-it-tmpl-", dir="/run")) / "template"
    return replace(cfg, factory=replace(cfg.factory, enable_template=True, template_path=str(tmpl),
                                        vm_cache_number=0),
                   hypervisor=replace(cfg.hypervisor, default_vcpus=2,
                                      options=replace(cfg.hypervisor.options, pcie_root_ports=1)))


@pytest.fixture(scope="module")
def cfg():
    cfg = _config()
    yield cfg
    asyncio.run(Template(cfg.factory.template_path).destroy())
    shutil.rmtree(Path(cfg.factory.template_path).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def template(cfg):
    """The template, warmed by one container (shim.factory.warmup) before it was saved."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("shim.factory.warmup")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        info = asyncio.run(Template(cfg.factory.template_path).build(
            node_vm_config(cfg), "qemu", boot_timeout=120, ready=prepare_template))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not [r.getMessage() for r in records if "warm-up" in r.getMessage()], "the warm-up did not run"
    return info


@dataclass
class Clone:
    sandbox: Path
    shared: Path
    hv: QemuHypervisor
    agent: GuestAgent
    how: str
    records: list[dict]


@contextlib.asynccontextmanager
async def clone(cfg: cfgmod.Config, hostname: str) -> AsyncIterator[Clone]:
    """A sandbox VM through the factory (as Sandbox._boot does): clone, identity reset, CreateSandbox."""
    sandbox = Path(tempfile.mkdtemp(prefix="kc-it-sb-", dir="/run"))
    shared = sandbox / "shared"
    shared.mkdir(mode=0o700)
    vm_id = vmdir.new_vm_id()
    vmcfg = vm_config(cfg, vm_id, vmdir.vm_dir(vm_id), shared_dirs=(SharedDir(SHARE_TAG, str(shared)),))
    records: list[dict] = []
    hv: QemuHypervisor = QemuHypervisor()
    agent: GuestAgent | None = None
    try:
        started, how, _ = await VmFactory(cfg, sandbox_id=hostname).start_vm(
            hv, vmcfg, lambda d, r: records.append(r), boot_timeout=120)
        assert isinstance(started, QemuHypervisor)
        hv = started
        agent = GuestAgent(hv.agent_address())
        await agent.connect(timeout=60, vm_gone=asyncio.Event())
        await agent.reset_identity(os.urandom(512))
        await agent.create_sandbox(hostname, hostname=hostname, storages=[ninep_storage(SHARE_TAG)])
        yield Clone(sandbox, shared, hv, agent, how, records)
    finally:
        if agent is not None:
            await agent.close()
        await hv.stop(timeout=10)
        await hv.cleanup()
        shutil.rmtree(sandbox, ignore_errors=True)


async def run_in(vm: Clone, cid: str, script: str) -> str:
    """``script`` in a container sharing the guest's UTS namespace (it sees the VM's hostname)."""
    build_rootfs(vm.shared / cid / "rootfs")
    spec = make_spec(["sh", "-c", script])
    spec.Root.Path = f"{GUEST_SHARED_DIR}/{cid}/rootfs"
    spec.Hostname = ""
    keep = [ns for ns in spec.Linux.Namespaces if ns.Type != "uts"]
    del spec.Linux.Namespaces[:]
    spec.Linux.Namespaces.extend(keep)
    c = vm.agent.client
    await c.create_container(cid, spec)
    await c.start_container(cid)
    out = (await read_all(c, cid)).decode()
    assert await c.wait_process(cid) == 0, out
    await c.remove_container(cid)
    return out


# adjtimex prints the guest's CLOCK_REALTIME with microseconds (busybox date has no %N)
CLOCK = "adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {printf \"%d.%06d\\n\", s, $2}'"
PROBE = f"hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; {CLOCK}"


async def test_two_clones_started_at_once_are_different_machines(cfg, template):
    async with clone(cfg, "kc-clone-a") as a, clone(cfg, "kc-clone-b") as b:
        assert a.how == b.how == TEMPLATE
        outs = await asyncio.gather(run_in(a, "p", PROBE), run_in(b, "p", PROBE))
        (name_a, rnd_a, _), (name_b, rnd_b, _) = (o.split() for o in outs)
        assert (name_a, name_b) == ("kc-clone-a", "kc-clone-b")
        assert re.fullmatch(r"[0-9a-f]{64}", rnd_a) and rnd_a != rnd_b, outs
        for vm in (a, b):  # the guest reads its clock somewhere between t0 and t1
            t0 = time.time()
            clock = float((await run_in(vm, "c", CLOCK)).strip())
            t1 = time.time()
            assert t0 - 1.0 < clock < t1 + 1.0, (t0, clock, t1)
        # both map the template's memory file privately: reads share its pages
        for vm in (a, b):
            maps = Path(f"/proc/{vm.hv.vmm_pid()}/maps").read_text()
            assert template.memory_file in maps
        assert a.records[0]["pid"] == 0 and a.records[-1]["pid"] == a.hv.vmm_pid()  # journaled first


async def test_a_released_clone_is_adopted_and_recovered_from_its_record(cfg, template):
    async with clone(cfg, "kc-clone-c") as c:
        record = await c.hv.release()
        await c.agent.close()
        adopter = QemuHypervisor()
        await adopter.adopt(record, timeout=10)
        assert adopter.vmm_pid() == record["pid"] and await adopter.status() == "running"
        assert (await adopter.vcpu_threads()).keys() == {0, 1}
        c.agent = GuestAgent(adopter.agent_address())
        await c.agent.connect(timeout=10, vm_gone=asyncio.Event())
        assert (await run_in(c, "x", "echo adopted")).strip() == "adopted"
        # the shim crashes here: delete recovers the VM from the journal record alone
        await QemuHypervisor.recover(adopter.record())
        assert await asyncio.wait_for(adopter.wait(), 10) == 255  # not our child: status unknown
        assert not os.path.exists(f"/proc/{record['pid']}/cmdline") or \
            b"qemu" not in Path(f"/proc/{record['pid']}/cmdline").read_bytes()
        assert not os.path.exists(record["state_dir"])


async def test_a_truncated_device_state_fails_the_restore_and_leaves_nothing(cfg, template, tmp_path):
    broken = Path(tempfile.mkdtemp(prefix="kc-it-broken-", dir="/run"))
    try:
        state = (Path(template.path) / "state").read_bytes()
        (broken / "state").write_bytes(state[: len(state) // 2])
        vm_id = vmdir.new_vm_id()
        vmcfg = replace(node_vm_config(cfg), vm_id=vm_id, state_dir=str(vmdir.vm_dir(vm_id)),
                        shared_dirs=(SharedDir(SHARE_TAG, str(broken)),), memory_file=template.memory_file)
        hv = QemuHypervisor()
        await hv.prepare(vmcfg)
        with pytest.raises(HypervisorError, match="restoring the VM|exited"):
            await hv.restore(str(broken), timeout=30)
        assert hv.vmm_pid() is None or not os.path.exists(f"/proc/{hv.vmm_pid()}/exe")
        assert not os.path.exists(vmcfg.state_dir)
    finally:
        shutil.rmtree(broken, ignore_errors=True)


async def test_destroy_while_clones_run(cfg, template):
    async with clone(cfg, "kc-clone-d") as d:
        tmpl = Template(cfg.factory.template_path)
        assert d.hv.vmm_pid() in tmpl.status()["clones"]
        assert await tmpl.destroy()
        assert not is_mountpoint(tmpl.path) and not tmpl.path.exists()
        assert (await run_in(d, "after", "echo still running")).strip() == "still running"
