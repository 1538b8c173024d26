"""The VM cache daemon over its real ttrpc socket with a hypervisor double: fill, hand-over with
lease and confirm, refill, lease expiry, a VM that died while cached, Status, Quit, and a
restarted daemon removing what a killed one left."""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace

import pytest

from common.errors import NotFound
from shim import config as cfgmod
from shim.factory import cache_server as cachemod
from shim.factory import factory as factorymod
from shim.factory import vmdir
from shim.factory.cache_client import CacheClient
from shim.factory.cache_server import VmCacheServer
from shim.factory.template import Template
from tests.unit.factory.fakehv import FakeHv

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")]


async def ready(hv, cfg, timeout):
    return None


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    monkeypatch.setattr(vmdir, "VM_ROOT", tmp_path / "vm")
    monkeypatch.setattr(cachemod, "prepare_template", ready)
    monkeypatch.setattr(factorymod, "prepare_template", ready)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    cfg = cfgmod.parse(f"""
[hypervisor.qemu]
kernel = "{kernel}"
initrd = ""
[factory]
enable_template = true
template_path = "{tmp_path / 'vm' / 'template'}"
vm_cache_number = 2
vm_cache_endpoint = "{tmp_path / 'cache.sock'}"
""")
    made: list[FakeHv] = []

    def factory(name: str) -> FakeHv:
        hv = FakeHv([])
        made.append(hv)
        return hv

    server = VmCacheServer(cfg, hypervisor_factory=factory)
    yield server, made, CacheClient(cfg.factory.vm_cache_endpoint)
    Template(cfg.factory.template_path)._unmount()


async def until(check, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture
async def running(daemon):
    server, made, client = daemon
    up = asyncio.Event()
    task = asyncio.create_task(server.run(up))
    await asyncio.wait_for(up.wait(), 10)
    await until(lambda: len(server.ready) == 2)
    yield server, made, client, task
    if not task.done():
        await client.quit()
        await asyncio.wait_for(task, 10)


async def test_hand_over_confirm_and_refill(running):
    server, made, client, _ = running
    with pytest.raises(NotFound, match="not other"):
        await client.get_base_vm("other")
    vm = await client.get_base_vm(server.key)
    record = json.loads(vm.hypervisor)
    assert vm.driver == "qemu" and vm.key == server.key and vm.memory == 512
    handed = next(h for h in made if h.record()["vm_id"] == vm.id)
    assert handed.released and handed.paused  # released while still paused: the shim resumes it
    assert record["config"]["shared_dirs"][0]["host_path"] == os.path.join(record["state_dir"], "shared")
    assert os.path.isdir(os.path.join(record["state_dir"], "shared"))
    st = await client.status()
    assert {v.state for v in st.vmstatus} >= {"leased"} and st.wanted == 2
    journal = json.loads(server.journal_path.read_text())["vms"]
    assert vm.id in journal  # still the daemon's until confirmed
    await client.confirm_vm(vm.id)
    assert vm.id not in json.loads(server.journal_path.read_text())["vms"]
    await until(lambda: len(server.ready) == 2)  # refilled
    st = await client.status()
    assert st.handed_out == 1 and [v.state for v in st.vmstatus] == ["ready", "ready"]
    with pytest.raises(NotFound):
        await client.confirm_vm(vm.id)


async def test_an_unconfirmed_lease_is_killed(running, monkeypatch):
    server, made, client, _ = running
    monkeypatch.setattr(cachemod, "LEASE_SECONDS", 0.05)
    vm = await client.get_base_vm(server.key)
    state_dir = json.loads(vm.hypervisor)["state_dir"]
    await until(lambda: not os.path.exists(state_dir))  # recovered from its record
    assert vm.id not in server.leased and vm.id not in json.loads(server.journal_path.read_text())["vms"]
    with pytest.raises(NotFound):
        await client.confirm_vm(vm.id)


async def test_a_vm_that_died_while_cached_is_not_handed_out(running):
    server, made, client, _ = running
    first = server.ready[0]
    first.hv.die()
    vm = await client.get_base_vm(server.key)
    assert vm.id != first.id and not os.path.exists(first.hv.cfg.state_dir)


async def test_quit_destroys_cached_vms(running):
    server, made, client, task = running
    dirs = [vm.hv.cfg.state_dir for vm in server.ready]
    await client.quit()
    await asyncio.wait_for(task, 10)
    assert not any(os.path.exists(d) for d in dirs)
    assert not server.journal_path.exists() and not os.path.exists(server.endpoint)


async def test_a_restarted_daemon_removes_what_a_killed_one_left(daemon, tmp_path):
    server, made, client = daemon
    left = tmp_path / "vm" / "leftover"
    left.mkdir(parents=True)
    (left / ".kata-colo-vm").write_text("x")
    server.journal_path.write_text(json.dumps({"vms": {"leftover": {"driver": "qemu",
                                                                    "record": {"state_dir": str(left), "pid": 0}}}}))
    assert await server.recover_leftovers() == 1
    assert not left.exists() and not server.journal_path.exists()


async def test_shim_gets_a_cached_vm_through_the_factory(running, tmp_path, monkeypatch):
    server, made, client, _ = running
    monkeypatch.setattr(factorymod, "join_my_cgroups", lambda pid: None)
    from hypervisor.base import SharedDir
    from shim.sandbox.vmconfig import vm_config

    shared = tmp_path / "sb" / "shared"
    shared.mkdir(parents=True)
    vm_id = vmdir.new_vm_id()
    vmcfg = vm_config(server.cfg, vm_id, vmdir.vm_dir(vm_id), shared_dirs=(SharedDir("kataShared", str(shared)),))
    shim_made: list[FakeHv] = []

    def factory(name):
        shim_made.append(FakeHv([]))
        return shim_made[-1]

    journal: list[dict] = []
    hv, how, _ = await factorymod.VmFactory(replace(server.cfg), hypervisor_factory=factory).start_vm(
        factory("qemu"), vmcfg, lambda d, r: journal.append(r), boot_timeout=5)
    assert how == factorymod.CACHE and server.handed == 1
    assert hv.cfg.state_dir == journal[0]["state_dir"] and not hv.paused
