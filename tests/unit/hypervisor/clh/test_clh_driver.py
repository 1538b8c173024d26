"""CloudHypervisor driving the fake VMM (fake_clh.py exec'd as the binary): the whole lifecycle,
boot failures, and recovery from a fresh process. Every request the driver sends is checked by
the fake against the upstream API schema (the ``fake_vmm`` fixture fails the test on any
violation); the answers it gets are schema-valid."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from clh_testlib import FAKE_CLH, FakeVmm, make_cfg, tap_available

from agent_api.client.transport import connect_hvsock
from common.errors import FailedPrecondition, HypervisorError, InvalidArgument, NotFound
from hypervisor.base import (
    AttachedDevice,
    BlockDevice,
    DeviceHotplug,
    GuestConsole,
    Hypervisor,
    MemoryControl,
    NetDevice,
    PauseResume,
    Snapshot,
    VfioDevice,
    VmmMetrics,
)
from hypervisor.clh.driver import CloudHypervisor
from hypervisor.clh.options import ClhOptions
from hypervisor.clh.vmconfig import ClhPaths

MIB = 1 << 20


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


async def vcpu_count(hv: CloudHypervisor, want: int, timeout: float = 5.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        threads = await hv.vcpu_threads()
        if len(threads) == want or time.monotonic() > deadline:
            return threads
        await asyncio.sleep(0.02)


async def test_whole_lifecycle_against_the_schema(tmp_path: Path, fake_vmm: FakeVmm, queue_fds):
    nic0 = NetDevice("net0", "02:00:00:00:00:01", queue_fds("kcclh0", 2))
    cfg = make_cfg(tmp_path, nics=(nic0,),
                   disks=(BlockDevice("data0", str(tmp_path / "vmlinux"), readonly=True, serial="d0"),))
    hv = CloudHypervisor()
    assert isinstance(hv, Hypervisor)
    for cap in (PauseResume, DeviceHotplug, MemoryControl, Snapshot, GuestConsole, VmmMetrics):
        assert isinstance(hv, cap)
    await hv.prepare(cfg)
    paths = ClhPaths(cfg.state_dir)
    assert hv.argv == [FAKE_CLH, "--api-socket", f"path={paths.api_socket}"]
    assert hv.capabilities().shared_fs == ()
    await hv.start(timeout=20)
    try:
        pid = hv.vmm_pid()
        assert pid and proc_alive(pid)
        # the process the driver started is the VMM: its command line names our API socket
        assert cmdline(pid)[-2:] == ["--api-socket", f"path={paths.api_socket}"]
        assert fake_vmm.starts()[0] == {"argv": ["--api-socket", f"path={paths.api_socket}"], "pid": pid}
        assert hv.record() == {"state_dir": cfg.state_dir, "pid": pid}
        # kata's boot order; the NIC is added between create and boot with its fds
        assert fake_vmm.calls()[-5:] == ["vm.create", "vm.info", "vm.add-net", "vm.boot", "vm.info"]
        assert set(fake_vmm.calls()[:-5]) == {"vmm.ping"}
        add_net = fake_vmm.last("vm.add-net")
        assert add_net["body"] == {"id": "net0", "mac": "02:00:00:00:00:01", "num_queues": 4, "queue_size": 256}
        expected_kind = "tap" if tap_available() else "pipe"
        assert [f["kind"] for f in add_net["fds"]] == [expected_kind] * 2
        if tap_available():
            assert {f["ifname"] for f in add_net["fds"]} == {"kcclh0"}
        create = fake_vmm.last("vm.create")["body"]
        assert create["disks"] == [{"path": str(tmp_path / "vmlinux"), "readonly": True, "id": "data0",
                                    "num_queues": 2, "queue_size": 1024, "serial": "d0"}]
        assert create["vsock"] == {"cid": 3, "socket": paths.vsock_socket}
        assert "net" not in create

        # vCPU threads are the VMM's threads named vcpu<N>
        threads = await hv.vcpu_threads()
        assert sorted(threads) == [0, 1]
        assert all(os.path.exists(f"/proc/{pid}/task/{tid}") for tid in threads.values())
        assert await hv.status() == "Running"
        assert "booted" in hv.console_tail()

        # the agent address is the hybrid vsock CH serves: CONNECT <port> → OK
        addr = hv.agent_address()
        assert (addr.transport, addr.path, addr.port) == ("hybrid-vsock", paths.vsock_socket, cfg.vsock_port)
        reader, writer = await connect_hvsock(addr.path, addr.port, timeout=2)
        writer.close()

        # hotplug: disk, NIC (fds as SCM_RIGHTS), VFIO; guest PCI path from the bdf
        disk = BlockDevice("disk1", str(tmp_path / "initramfs.cpio"))
        attached = await hv.add_device(disk)
        assert attached == AttachedDevice("disk1", "04")  # data0 and net0 took slots 02 and 03 at boot
        body = fake_vmm.last("vm.add-disk")["body"]
        assert body == {"path": disk.path, "readonly": False, "id": "disk1", "num_queues": 2, "queue_size": 1024}
        nic1 = NetDevice("net1", "02:00:00:00:00:02", queue_fds("kcclh1", 1))
        assert (await hv.add_device(nic1)).guest_pci_path == "05"
        assert len(fake_vmm.last("vm.add-net")["fds"]) == 1
        assert (await hv.add_device(VfioDevice("gpu0", "0000:3B:00.0"))).guest_pci_path == "06"
        assert fake_vmm.last("vm.add-device")["body"] == {"id": "gpu0", "path": "/sys/bus/pci/devices/0000:3b:00.0/"}
        with pytest.raises(InvalidArgument, match="already attached"):
            await hv.add_device(disk)
        await hv.remove_device("disk1", timeout=5)
        assert fake_vmm.last("vm.remove-device")["body"] == {"id": "disk1"}
        assert "disk1" not in (await hv.api.info())["device_tree"]
        with pytest.raises(NotFound):
            await hv.remove_device("disk1")

        # resize: vCPUs (capped at max_vcpus, like kata), RAM (ACPI, 128 MiB blocks), balloon
        assert await hv.resize_vcpus(3) == 3
        assert sorted(await vcpu_count(hv, 3)) == [0, 1, 2]
        assert await hv.resize_vcpus(99) == 4
        assert fake_vmm.last("vm.resize")["body"] == {"desired_vcpus": 4}
        assert sorted(await vcpu_count(hv, 4)) == [0, 1, 2, 3]
        assert hv.memory_mechanisms() == ("dimm", "balloon")
        assert await hv.resize_memory(600) == 640
        assert fake_vmm.last("vm.resize")["body"] == {"desired_ram": 640 * MIB}
        assert await hv.resize_memory(520) == 640  # ACPI never shrinks (kata: nothing to do)
        mem = await hv.memory_info()
        assert (mem.boot, mem.plugged, mem.ballooned, mem.max) == (512 * MIB, 128 * MIB, 0, 1024 * MIB)
        await hv.balloon(400 * MIB)
        # desired_balloon is what the balloon REMOVES: 640 - 400 MiB
        assert fake_vmm.last("vm.resize")["body"] == {"desired_balloon": 240 * MIB}
        assert (await hv.balloon_info()).actual_bytes == 400 * MIB
        assert (await hv.memory_info()).ballooned == 240 * MIB
        with pytest.raises(InvalidArgument):
            await hv.balloon(641 * MIB)
        assert (await hv.vmm_counters())["data0.read_bytes"] == 4096.0

        # pause/resume
        await hv.pause()
        assert await hv.status() == "Paused"
        await hv.resume()
        assert await hv.status() == "Running"

        # snapshot: pauses, CH writes its files, the VM stays paused
        snap = tmp_path / "snapshot"
        await hv.save(str(snap))
        assert fake_vmm.last("vm.snapshot")["body"] == {"destination_url": f"file://{snap}"}
        assert sorted(os.listdir(snap)) == ["config.json", "memory-ranges", "state.json"]
        assert await hv.status() == "Paused"
        await hv.resume()
    finally:
        await hv.stop(timeout=5)
    # stop: vm.shutdown → vm.delete → vmm.shutdown, and the VMM exits on its own
    assert fake_vmm.calls()[-3:] == ["vm.shutdown", "vm.delete", "vmm.shutdown"]
    assert await hv.wait() == 0
    await hv.cleanup()
    assert not os.path.exists(cfg.state_dir)
    assert not proc_alive(pid)


async def test_snapshot_restore_in_a_new_vmm(tmp_path: Path, fake_vmm: FakeVmm):
    cfg = make_cfg(tmp_path, options=ClhOptions(hotplug_method="virtio-mem"))
    hv = CloudHypervisor()
    await hv.prepare(cfg)
    await hv.start(timeout=20)
    assert hv.memory_mechanisms() == ("virtio-mem", "balloon")
    assert await hv.resize_memory(700) == 700
    assert await hv.resize_memory(600) == 600  # virtio-mem shrinks live
    assert fake_vmm.last("vm.resize")["body"] == {"desired_ram": 600 * MIB}
    snap = tmp_path / "snap"
    await hv.save(str(snap))
    first_pid = hv.vmm_pid()
    await hv.stop(timeout=5)
    await hv.cleanup()
    assert not os.path.exists(cfg.state_dir)

    restored = CloudHypervisor()
    await restored.prepare(cfg)
    await restored.restore(str(snap), timeout=20, resume=True)
    try:
        assert restored.vmm_pid() != first_pid
        assert fake_vmm.last("vm.restore")["body"] == {"source_url": f"file://{snap}", "resume": True}
        assert "vm.create" not in fake_vmm.calls()[fake_vmm.calls().index("vm.restore"):]
        assert await restored.status() == "Running"
        assert sorted(await restored.vcpu_threads()) == [0, 1]
        assert (await restored.memory_info()).plugged == 88 * MIB
    finally:
        await restored.stop(timeout=5)
        await restored.cleanup()


async def test_restore_refuses_nics(tmp_path: Path, fake_vmm: FakeVmm, queue_fds):
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_text(json.dumps({"net": [{"id": "net0"}]}))
    hv = CloudHypervisor()
    await hv.prepare(make_cfg(tmp_path))
    with pytest.raises(InvalidArgument, match=r"net0.*net_fds"):
        await hv.restore(str(snap), timeout=5)
    assert hv.vmm_pid() is None
    await hv.cleanup()


async def test_missing_binary_fails_at_prepare_and_leaves_nothing(tmp_path: Path):
    cfg = make_cfg(tmp_path, hypervisor_path="/nonexistent/cloud-hypervisor")
    hv = CloudHypervisor()
    with pytest.raises(InvalidArgument, match="/nonexistent/cloud-hypervisor does not exist"):
        await hv.prepare(cfg)
    assert not os.path.exists(cfg.state_dir)
    (tmp_path / "not-exec").write_text("")
    with pytest.raises(InvalidArgument, match="not an executable file"):
        await CloudHypervisor().prepare(replace(cfg, hypervisor_path=str(tmp_path / "not-exec")))
    assert not os.path.exists(cfg.state_dir)


@pytest.mark.parametrize("change, fragment", [
    (dict(agent_channel="virtio-serial"), "hybrid-vsock only"),
    (dict(agent_channel="vsock"), "hybrid-vsock only"),
    (dict(disks=(BlockDevice("d0", "/x", driver="virtio-scsi"),)), "only"),
    (dict(vfio=(VfioDevice("v0", "3b:00.0"),)), "bad PCI address"),
    (dict(vcpus=1, max_vcpus=1, nics=(NetDevice("n0", "02:00:00:00:00:01", (10, 11)),)), "exceed the 1 vCPUs"),
    (dict(state_dir="relative"), "absolute"),
    (dict(state_dir="/run/" + "x" * 90), "too long for unix sockets"),
    (dict(options=object()), "options of another driver"),
])
async def test_bad_config_is_refused_before_anything_exists(tmp_path: Path, change, fragment):
    cfg = make_cfg(tmp_path, **change)
    with pytest.raises(InvalidArgument, match=fragment):
        await CloudHypervisor().prepare(cfg)
    assert not os.path.exists(tmp_path / "vm")


async def test_9p_shares_are_refused(tmp_path: Path):
    from hypervisor.base import SharedDir

    cfg = make_cfg(tmp_path, shared_dirs=(SharedDir("kataShared", str(tmp_path)),))
    with pytest.raises(InvalidArgument, match="no virtio-9p"):
        await CloudHypervisor().prepare(cfg)


@pytest.mark.parametrize("endpoint, action, error, fragment", [
    ("vm.boot", "exit", HypervisorError, r"exited with status 7 during vm\.boot"),
    ("vm.create", "drop", HypervisorError, r"connection lost during vm\.create"),
    ("vm.create", {"status": 400, "message": "Invalid CPU topology"}, InvalidArgument, "Invalid CPU topology"),
    ("vm.add-net", {"status": 500, "message": "Failed to open tap"}, HypervisorError, "HTTP 500.*Failed to open tap"),
    ("vm.boot", {"status": 404, "message": "VM is not created"}, NotFound, "VM is not created"),
])
async def test_boot_failure_kills_the_vmm_and_removes_its_files(tmp_path: Path, fake_vmm: FakeVmm, queue_fds,
                                                                endpoint, action, error, fragment):
    fake_vmm.script({endpoint: [action]})
    cfg = make_cfg(tmp_path, nics=(NetDevice("net0", "02:00:00:00:00:01", queue_fds("kcclhf", 1)),))
    hv = CloudHypervisor()
    await hv.prepare(cfg)
    with pytest.raises(error, match=fragment) as info:
        await hv.start(timeout=20)
    assert "fake-clh: serving" in str(info.value)  # the VMM's log tail is in the error
    pid = hv.vmm_pid()
    assert pid is not None and not proc_alive(pid)
    assert not os.path.exists(cfg.state_dir)


async def test_vm_not_running_after_boot_is_an_error(tmp_path: Path, fake_vmm: FakeVmm):
    fake_vmm.script({"vm.info": [{"delay": 0}, {"status": 500, "message": "info broke"}]})
    hv = CloudHypervisor()
    await hv.prepare(make_cfg(tmp_path))
    with pytest.raises(HypervisorError, match="info broke"):
        await hv.start(timeout=20)
    assert not os.path.exists(tmp_path / "vm")


async def test_vmm_that_never_answers_hits_the_boot_deadline(tmp_path: Path, fake_vmm: FakeVmm):
    fake_vmm.script({"vm.create": [{"delay": 3}]})
    hv = CloudHypervisor()
    await hv.prepare(make_cfg(tmp_path))
    t0 = time.monotonic()
    from common.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded, match="did not finish within 1.5s"):
        await hv.start(timeout=1.5)
    assert time.monotonic() - t0 < 3
    assert not proc_alive(hv.vmm_pid() or 0)
    assert not os.path.exists(tmp_path / "vm")


async def test_vmm_dying_on_its_own_resolves_wait_and_calls_fail_clearly(tmp_path: Path, fake_vmm: FakeVmm):
    hv = CloudHypervisor()
    await hv.prepare(make_cfg(tmp_path))
    await hv.start(timeout=20)
    pid = hv.vmm_pid()
    assert pid is not None
    fake_vmm.script({"vm.pause": ["exit"]})
    with pytest.raises(HypervisorError, match=rf"pid {pid}\) exited with status 7 during vm\.pause"):
        await hv.pause()
    assert await asyncio.wait_for(hv.wait(), 5) == 7
    with pytest.raises(FailedPrecondition, match="not running"):
        await hv.resume()
    await hv.stop()
    await hv.cleanup()
    assert not os.path.exists(tmp_path / "vm")


async def test_hotplug_with_an_unexpected_bdf_is_rolled_back(tmp_path: Path, fake_vmm: FakeVmm, monkeypatch):
    hv = CloudHypervisor()
    await hv.prepare(make_cfg(tmp_path))
    await hv.start(timeout=20)
    try:
        real = hv.api.add_disk

        async def behind_a_bridge(body):
            info = await real(body)
            return {**info, "bdf": "0000:01:00.0"}

        monkeypatch.setattr(hv.api, "add_disk", behind_a_bridge)
        with pytest.raises(HypervisorError, match="unexpected PCI address"):
            await hv.add_device(BlockDevice("d1", str(tmp_path / "vmlinux")))
        assert fake_vmm.last("vm.remove-device")["body"] == {"id": "d1"}
        assert "d1" not in hv._devices
    finally:
        await hv.stop(timeout=5)
        await hv.cleanup()


async def test_recover_kills_a_leftover_vmm_from_its_record(tmp_path: Path, fake_vmm: FakeVmm):
    cfg = make_cfg(tmp_path)
    hv = CloudHypervisor()
    await hv.prepare(cfg)
    before_start = hv.record()
    assert before_start["pid"] == 0
    await hv.start(timeout=20)
    pid = hv.vmm_pid()
    assert pid is not None
    # the shim is "killed": the VMM lives on; a fresh process recovers from the record alone
    record = json.loads(json.dumps({"driver": "clh", **hv.record()}))
    await CloudHypervisor.recover(record)
    assert not proc_alive(pid)
    assert not os.path.exists(cfg.state_dir)
    await CloudHypervisor.recover(record)  # idempotent
    await hv.cleanup()


async def test_recover_finds_a_vmm_whose_pid_was_never_journaled(tmp_path: Path, fake_vmm: FakeVmm):
    cfg = make_cfg(tmp_path)
    hv = CloudHypervisor()
    await hv.prepare(cfg)
    record = hv.record()  # journaled before start: no pid yet
    await hv.start(timeout=20)
    pid = hv.vmm_pid()
    assert pid is not None
    os.unlink(ClhPaths(cfg.state_dir).pidfile)
    await CloudHypervisor.recover(record)
    assert not proc_alive(pid)
    assert not os.path.exists(cfg.state_dir)
    await hv.cleanup()


async def test_recover_never_kills_a_process_that_is_not_our_vmm(tmp_path: Path):
    state = tmp_path / "vm"
    state.mkdir()
    other = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        (state / "clh.pid").write_text(f"{other.pid}\n")  # pid reuse: the pidfile names a stranger
        await CloudHypervisor.recover({"state_dir": str(state), "pid": other.pid})
        assert proc_alive(other.pid)
        assert not (state / "clh.pid").exists()
    finally:
        other.send_signal(signal.SIGKILL)
        await other.wait()
