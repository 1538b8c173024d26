"""VmFactory and the on-disk template with a hypervisor double (no QEMU): which way a VM starts
and why, the template's checks (truncated, foreign, half-built), fallbacks that leave nothing,
concurrent clones, destroy. The template is a real tmpfs (root)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from common.errors import HypervisorError
from common.mount import is_mountpoint
from hypervisor.base import BlockDevice, NetDevice, SharedDir, VmConfig
from shim import config as cfgmod
from shim.factory import factory as factorymod
from shim.factory import template as tmplmod
from shim.factory import vmdir
from shim.factory.factory import CACHE, COLD, TEMPLATE, VmFactory
from shim.factory.template import Template, TemplateUnusable
from shim.sandbox.vmconfig import vm_config
from tests.unit.factory.fakehv import FakeHv, with_options

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setattr(vmdir, "VM_ROOT", tmp_path / "vm")
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    tmpl = tmp_path / "vm" / "template"
    text = f"""
[hypervisor.qemu]
kernel = "{kernel}"
initrd = ""
pcie_root_ports = 1
[factory]
enable_template = true
template_path = "{tmpl}"
"""
    cfg = cfgmod.parse(text)
    log: list[tuple[str, object]] = []
    made: list[FakeHv] = []
    fail: set[str] = set()

    def factory(name: str) -> FakeHv:
        hv = FakeHv(log, fail if not made else set())  # only the first instance fails
        made.append(hv)
        return hv

    yield cfg, log, made, fail, factory, tmp_path
    Template(tmpl)._unmount()


def sandbox_vm(cfg, tmp_path: Path, **kw) -> VmConfig:
    vm_id = vmdir.new_vm_id()
    shared = tmp_path / f"sb-{vm_id[:6]}" / "shared"
    shared.mkdir(parents=True)
    base = vm_config(cfg, vm_id, vmdir.vm_dir(vm_id), shared_dirs=(SharedDir("kataShared", str(shared)),))
    return replace(base, **kw)


async def ready(hv, cfg, timeout):
    hv.log.append(("agent-ready", None))


@pytest.fixture(autouse=True)
def fake_agent_ready(monkeypatch):
    monkeypatch.setattr(factorymod, "prepare_template", ready)


def journaling() -> tuple[list[dict], callable]:
    records: list[dict] = []
    return records, lambda driver, rec: records.append({"driver": driver, **rec})


async def start(cfg, factory, vmcfg):
    records, journal = journaling()
    hv, how, attached = await VmFactory(cfg, sandbox_id="sb", hypervisor_factory=factory).start_vm(
        factory("qemu"), vmcfg, journal, boot_timeout=5)
    assert how != COLD or attached == {}
    hv.attached = attached
    return hv, how, records


async def test_templating_off_boots_cold(env):
    cfg, log, made, fail, factory, tmp = env
    cfg = replace(cfg, factory=replace(cfg.factory, enable_template=False))
    hv, how, records = await start(cfg, factory, sandbox_vm(cfg, tmp))
    assert how == COLD and [c for c, _ in log] == ["prepare", "start"]
    assert len(records) == 2 and records[0]["pid"] == 0 and records[1]["pid"] == hv.pid  # before and after


async def test_first_sandbox_builds_the_template_then_clones(env, caplog):
    cfg, log, made, fail, factory, tmp = env
    caplog.set_level(logging.INFO)
    nic = NetDevice("net0", "02:00:00:00:00:07", (99,))
    vmcfg = sandbox_vm(cfg, tmp, nics=(nic,))
    hv, how, records = await start(cfg, factory, vmcfg)
    assert how == TEMPLATE
    calls = [c for c, _ in log]
    assert calls == ["prepare", "start", "agent-ready", "save", "stop", "cleanup",  # the template VM
                     "prepare", "restore", "add_device"]          # the clone, resumed, its NIC plugged
    tmpl_cfg = log[0][1]
    assert tmpl_cfg.memory_shared and tmpl_cfg.memory_file == str(Path(cfg.factory.template_path) / "memory")
    assert not tmpl_cfg.nics and tmpl_cfg.shared_dirs[0].host_path.startswith(tmpl_cfg.state_dir)
    clone_cfg = log[6][1]
    assert clone_cfg.memory_file == tmpl_cfg.memory_file and not clone_cfg.memory_shared
    assert clone_cfg.nics == () and clone_cfg.shared_dirs == vmcfg.shared_dirs  # NICs: hot-plugged after
    assert log[8][1] == nic and not hv.paused and hv.attached["net0"].guest_pci_path == "02/00"
    assert records[0]["pid"] == 0 and records[-1]["pid"] == hv.pid
    assert is_mountpoint(cfg.factory.template_path)
    info = Template(cfg.factory.template_path).check()
    assert info is not None and oct(os.stat(info.memory_file).st_mode & 0o777) == "0o600"
    assert os.path.getsize(info.memory_file) == 512 << 20
    assert not os.path.exists(tmpl_cfg.state_dir)  # the template VM is gone
    assert any("building it" in r.getMessage() for r in caplog.records)
    assert any("clone of template" in r.getMessage() for r in caplog.records)


async def test_a_sandbox_of_another_shape_boots_cold_and_says_why(env, caplog):
    cfg, log, made, fail, factory, tmp = env
    await start(cfg, factory, sandbox_vm(cfg, tmp))
    log.clear()
    caplog.set_level(logging.INFO)
    hv, how, _ = await start(cfg, factory, sandbox_vm(cfg, tmp, memory_mib=1024))
    assert how == COLD and [c for c, _ in log] == ["prepare", "start"]
    lines = [r.getMessage() for r in caplog.records if "booting cold" in r.getMessage()]
    assert len(lines) == 1 and "memory_mib 512 → 1024" in lines[0], lines


@pytest.mark.parametrize("vmcfg_change, reason", [
    (dict(disks=(BlockDevice("d0", "/img/d", driver="virtio-scsi"),)), "virtio-scsi disk(s) d0"),
    (dict(nics=(NetDevice("n0", "02:00:00:00:00:01", (5,)),), disks=(BlockDevice("d0", "/img/d"),)),
     "2 device(s) to hot-plug (n0, d0) but pcie_root_ports = 1"),
])
async def test_what_a_clone_cannot_get_means_cold(env, caplog, vmcfg_change, reason):
    cfg, log, made, fail, factory, tmp = env
    caplog.set_level(logging.INFO)
    hv, how, _ = await start(cfg, factory, sandbox_vm(cfg, tmp, **vmcfg_change))
    assert how == COLD and [c for c, _ in log] == ["prepare", "start"]
    assert any(reason in r.getMessage() for r in caplog.records)
    assert not os.path.exists(cfg.factory.template_path)  # no template built for nothing


async def test_free_page_reporting_blocks_cloning(env, caplog):
    cfg, log, made, fail, factory, tmp = env
    caplog.set_level(logging.INFO)
    vmcfg = with_options(sandbox_vm(cfg, tmp), reclaim_guest_freed_memory=True)
    _, how, _ = await start(cfg, factory, vmcfg)
    assert how == COLD and any("reclaim_guest_freed_memory" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.truncate(p / "state", 3), "truncated"),
    (lambda p: os.truncate(p / "memory", 4096), "truncated"),
    (lambda p: (p / "state").write_bytes(b"x" * (p / "state").stat().st_size), "sha256"),
    (lambda p: os.unlink(p / "memory"), "missing"),
    (lambda p: (p / "template.json").write_text(json.dumps({**json.loads((p / "template.json").read_text()),
                                                            "shape": {"format": 99}})), "format"),
    (lambda p: (p / "template.json").write_text("{not json"), "not JSON"),
])
async def test_damaged_or_foreign_template_means_cold_with_a_warning_and_nothing_left(env, caplog, damage, message):
    cfg, log, made, fail, factory, tmp = env
    await start(cfg, factory, sandbox_vm(cfg, tmp))
    damage(Path(cfg.factory.template_path))
    log.clear()
    caplog.set_level(logging.INFO)
    before = {p.name for p in (tmp / "vm").iterdir()}
    hv, how, _ = await start(cfg, factory, sandbox_vm(cfg, tmp))
    assert how == COLD and [c for c, _ in log] == ["prepare", "start"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "template unusable" in r.getMessage()]
    assert len(warnings) == 1 and message in warnings[0].getMessage(), [r.getMessage() for r in caplog.records]
    with pytest.raises(TemplateUnusable):
        Template(cfg.factory.template_path).check()
    new = {p.name for p in (tmp / "vm").iterdir()} - before
    assert new == {os.path.basename(hv.cfg.state_dir)}  # only the cold VM


async def test_a_clone_that_fails_to_restore_falls_back_cold_on_a_fresh_driver(env, caplog):
    cfg, log, made, fail, factory, tmp = env
    await start(cfg, factory, sandbox_vm(cfg, tmp))
    made.clear()
    log.clear()
    fail.add("restore")
    caplog.set_level(logging.INFO)
    hv, how, records = await start(cfg, factory, sandbox_vm(cfg, tmp))
    assert how == COLD and hv is made[1] and made[0].cfg is not None
    assert [c for c, _ in log] == ["prepare", "restore", "cleanup", "prepare", "start"]
    # the failed clone's files went (cleanup) before the cold VM of the same id made its own
    assert hv.cfg.state_dir == made[0].cfg.state_dir and not hv.cfg.memory_file
    assert records[-1]["state_dir"] == hv.cfg.state_dir and records[-1]["pid"] == hv.pid
    assert any("template clone failed" in r.getMessage() for r in caplog.records)


async def test_a_device_that_does_not_plug_into_the_clone_means_cold(env, caplog):
    cfg, log, made, fail, factory, tmp = env
    await start(cfg, factory, sandbox_vm(cfg, tmp))
    made.clear()
    log.clear()
    fail.add("add_device")
    caplog.set_level(logging.INFO)
    hv, how, _ = await start(cfg, factory, sandbox_vm(cfg, tmp, disks=(BlockDevice("d0", "/img/d"),)))
    assert how == COLD and [c for c, _ in log] == ["prepare", "restore", "add_device", "cleanup", "prepare", "start"]
    assert hv.cfg.disks and not hv.cfg.memory_file  # cold-plugged on the cold boot
    assert any("hot-plugging d0 into the clone failed" in r.getMessage() for r in caplog.records)


async def test_a_half_built_template_is_undone_and_rebuilt(env):
    cfg, log, made, fail, factory, tmp = env
    fail.add("save")  # the builder dies half way (its first driver instance fails to save)
    with pytest.raises(HypervisorError):
        await Template(cfg.factory.template_path).build(
            sandbox_vm(cfg, tmp), "qemu", boot_timeout=5, ready=ready, hypervisor_factory=factory)
    assert not is_mountpoint(cfg.factory.template_path) and not os.path.exists(cfg.factory.template_path)
    # a build killed at any moment leaves build.json: the next build undoes it from there
    t = Template(cfg.factory.template_path)
    t._mount(16)
    vm_state = tmp / "vm" / "deadbeef"
    vm_state.mkdir()
    (vm_state / ".kata-colo-vm").write_text("x")
    (t.path / tmplmod.BUILD).write_text(json.dumps({"driver": "qemu", "vm": {"state_dir": str(vm_state), "pid": 0}}))
    with pytest.raises(TemplateUnusable, match="half-built"):
        t.check()
    info = await t.build(sandbox_vm(cfg, tmp), "qemu", boot_timeout=5, ready=ready, hypervisor_factory=factory)
    assert info.state_bytes > 0 and not vm_state.exists() and t.check() == info


async def test_two_sandboxes_cloning_at_once_build_one_template(env):
    cfg, log, made, fail, factory, tmp = env
    (a, how_a, _), (b, how_b, _) = await asyncio.gather(start(cfg, factory, sandbox_vm(cfg, tmp)),
                                                        start(cfg, factory, sandbox_vm(cfg, tmp)))
    assert how_a == how_b == TEMPLATE
    assert [c for c, _ in log].count("save") == 1 and [c for c, _ in log].count("restore") == 2
    assert a.cfg.vm_id != b.cfg.vm_id and a.cfg.state_dir != b.cfg.state_dir


async def test_destroy_removes_tmpfs_and_files(env):
    cfg, log, made, fail, factory, tmp = env
    await start(cfg, factory, sandbox_vm(cfg, tmp))
    t = Template(cfg.factory.template_path)
    fd = os.open(t.path / "memory", os.O_RDONLY)  # a running clone holds the memory file
    try:
        assert await t.destroy() is True
        assert not is_mountpoint(t.path) and not t.path.exists()
        assert os.read(fd, 1) == b"\0"  # the clone's file stays readable (detached tmpfs)
    finally:
        os.close(fd)
    assert await t.destroy() is False
    assert t.status()["template"] is None


class FakeCache:
    """The VM cache daemon's client side, handing out one VM made by ``hv``."""

    endpoint = "/run/test-cache.sock"

    def __init__(self, record: dict | None, confirm_fails: bool = False) -> None:
        self.record = record
        self.confirmed: list[str] = []
        self.confirm_fails = confirm_fails

    async def get_base_vm(self, key: str):
        from common.errors import NotFound
        from proto.kata_colo import cache_pb2

        if self.record is None:
            raise NotFound("empty")
        return cache_pb2.GrpcVM(id="c1", hypervisor=json.dumps(self.record).encode(), driver="qemu", key=key)

    async def confirm_vm(self, vm_id: str) -> None:
        if self.confirm_fails:
            raise HypervisorError("lease expired")
        self.confirmed.append(vm_id)


async def cached_vm(cfg, tmp: Path) -> dict:
    """A 'pre-booted' VM as the cache daemon makes it: its share exported from its own dir."""
    vm_id = vmdir.new_vm_id()
    state = vmdir.vm_dir(vm_id)
    vmcfg = replace(factorymod.node_vm_config(cfg), vm_id=vm_id, state_dir=str(state),
                    shared_dirs=(SharedDir("kataShared", str(state / "shared")),))
    hv = FakeHv([])
    await hv.prepare(vmcfg)
    (state / "shared").mkdir()
    (state / "shared" / "marker").write_text("exported since boot")
    await hv.restore(str(tmp), 1) if (tmp / "state").exists() else hv._run()
    return hv.record()


async def test_a_cached_vm_is_adopted_its_share_renamed_and_resumed(env, monkeypatch):
    cfg, log, made, fail, factory, tmp = env
    cfg = replace(cfg, factory=replace(cfg.factory, vm_cache_number=1))
    moved: list[int | None] = []
    monkeypatch.setattr(factorymod, "join_my_cgroups", moved.append)
    record = await cached_vm(cfg, tmp)
    cache = FakeCache(record)
    vmcfg = sandbox_vm(cfg, tmp)
    records, journal = journaling()
    hv, how, attached = await VmFactory(cfg, hypervisor_factory=factory, cache=cache).start_vm(
        factory("qemu"), vmcfg, journal, boot_timeout=5)
    assert how == CACHE and cache.confirmed == ["c1"] and moved == [record["pid"]]
    assert records[0]["state_dir"] == record["state_dir"]  # journaled before it was confirmed
    assert [c for c, _ in log] == ["adopt", "resume"] and attached == {}
    share = Path(vmcfg.shared_dirs[0].host_path)
    assert (share / "marker").read_text() == "exported since boot"
    assert not os.path.exists(os.path.join(record["state_dir"], "shared"))


async def test_an_empty_cache_falls_back_to_the_template_and_a_lost_lease_kills_the_vm(env, monkeypatch):
    cfg, log, made, fail, factory, tmp = env
    cfg = replace(cfg, factory=replace(cfg.factory, vm_cache_number=1))
    monkeypatch.setattr(factorymod, "join_my_cgroups", lambda pid: None)
    _, how, _ = await VmFactory(cfg, hypervisor_factory=factory, cache=FakeCache(None)).start_vm(
        factory("qemu"), sandbox_vm(cfg, tmp), journaling()[1], boot_timeout=5)
    assert how == TEMPLATE
    record = await cached_vm(cfg, tmp)
    _, how, _ = await VmFactory(cfg, hypervisor_factory=factory, cache=FakeCache(record, confirm_fails=True)).start_vm(
        factory("qemu"), sandbox_vm(cfg, tmp), journaling()[1], boot_timeout=5)
    assert how == TEMPLATE and not os.path.exists(record["state_dir"])  # recovered (killed, removed)
