"""QemuHypervisor against a real QEMU (TCG) booting the project's guest image.

Boot-heavy tests are few on purpose: each TCG boot costs seconds on a loaded 2-core box, so one
VM carries many assertions. The bad-kernel tests need no guest image and always run.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from common.errors import HypervisorError
from hypervisor.base import Hypervisor
from hypervisor.qemu.driver import QemuHypervisor
from tests.support import image  # noqa: F401
from tests.support.qemu import (
    MIB,
    assert_nothing_left,
    needs_image,
    needs_qemu,
    vm_config,
)

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

async def _until(predicate, timeout: float, interval: float = 0.2):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value or loop.time() > deadline:
            return value
        await asyncio.sleep(interval)


@needs_qemu
@needs_image
async def test_boot_2_vcpus_qmp_threads_pause_balloon_stop(tmp_path):
    cfg = vm_config(tmp_path)
    hv = QemuHypervisor()
    assert isinstance(hv, Hypervisor)
    await hv.prepare(cfg)
    t0 = time.monotonic()
    await hv.start(timeout=30)
    started = time.monotonic() - t0
    pid = hv.vmm_pid()
    try:
        assert pid is not None and os.path.exists(f"/proc/{pid}")
        assert int(Path(cfg.state_dir, "qemu.pid").read_text()) == pid
        assert hv.agent_address().transport == "virtio-serial"
        assert os.path.exists(hv.agent_address().path)
        assert (await hv.monitor.query_status())["status"] == "running"

        threads = await hv.vcpu_threads()
        assert sorted(threads) == [0, 1]
        assert len(set(threads.values())) == 2 and pid not in threads.values()
        for tid in threads.values():
            assert os.path.exists(f"/proc/{pid}/task/{tid}")
            assert Path(f"/proc/{pid}/task/{tid}/comm").read_text().startswith("CPU ")

        await hv.pause()
        assert await hv.status() == "paused"
        await hv.resume()
        assert await hv.status() == "running"

        info = await hv.balloon_info()
        assert info.actual_bytes == 512 * MIB
        await hv.balloon(384 * MIB)

        async def shrunk():
            return (await hv.balloon_info()).actual_bytes <= 400 * MIB
        # needs the guest's virtio_balloon driver, i.e. a booted guest: allow TCG boot time
        assert await _until(shrunk, timeout=60), "guest never inflated the balloon"
        await hv.balloon(512 * MIB)

        t1 = time.monotonic()
        await hv.stop(timeout=10)
        stopped = time.monotonic() - t1
        assert isinstance(await asyncio.wait_for(hv.wait(), 5), int)
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        await hv.cleanup()
    assert_nothing_left(cfg, pid)
    await hv.cleanup()  # idempotent
    print(f"\n[timing] start()→QMP up {started:.2f}s, stop {stopped:.2f}s")


@needs_qemu
@needs_image
async def test_4_vcpus_then_sigkill_resolves_wait(tmp_path):
    cfg = vm_config(tmp_path, vcpus=4, max_vcpus=4, balloon=False, pcie_root_ports=0)
    hv = QemuHypervisor()
    await hv.prepare(cfg)
    await hv.start(timeout=30)
    pid = hv.vmm_pid()
    try:
        threads = await hv.vcpu_threads()
        assert sorted(threads) == [0, 1, 2, 3]
        assert len(set(threads.values())) == 4
        assert all(os.path.exists(f"/proc/{pid}/task/{t}") for t in threads.values())
        os.kill(pid, signal.SIGKILL)
        assert await asyncio.wait_for(hv.wait(), 10) == -signal.SIGKILL
    finally:
        await hv.cleanup()
    assert_nothing_left(cfg, pid)


@needs_qemu
@needs_image
async def test_guest_poweroff_exits_qemu_and_keeps_console_until_cleanup(tmp_path):
    cfg = vm_config(tmp_path, kernel_params="kata_colo.init=poweroff", debug=True)
    hv = QemuHypervisor()
    await hv.prepare(cfg)
    t0 = time.monotonic()
    await hv.start(timeout=30)
    pid = hv.vmm_pid()
    try:
        rc = await asyncio.wait_for(hv.wait(), 120)
        booted = time.monotonic() - t0
        assert rc == 0
        assert hv.shutdown_reason == "guest-shutdown"
        console = Path(hv.console_log_path or "").read_text(errors="replace")
        assert "Linux version" in console
    finally:
        await hv.cleanup()
    assert_nothing_left(cfg, pid)
    print(f"\n[timing] qemu start → guest poweroff {booted:.2f}s")


@needs_qemu
@needs_image
async def test_cleanup_from_state_dir_only_kills_leftover_qemu(tmp_path):
    """``delete`` after a shim crash: only the state dir is known."""
    cfg = vm_config(tmp_path)
    hv = QemuHypervisor()
    await hv.prepare(cfg)
    await hv.start(timeout=30)
    pid = hv.vmm_pid()
    try:
        record = hv.record()
        assert record == {"state_dir": cfg.state_dir, "pid": pid}
        await QemuHypervisor.recover(record)
        assert_nothing_left(cfg, None)
        assert await asyncio.wait_for(hv.wait(), 10) == -signal.SIGKILL
    finally:
        await hv.cleanup()
    assert_nothing_left(cfg, pid)


@needs_qemu
@pytest.mark.parametrize("kind", ["missing", "garbage"])
async def test_bad_kernel_raises_and_leaves_nothing(tmp_path, kind):
    kernel = tmp_path / "vmlinux"
    if kind == "garbage":
        # Random bytes, except the setup-sectors byte (0x1f1): QEMU's x86 loader
        # accepts a headerless image as a real-mode kernel when (setup_sects + 1)
        # * 512 fits in the file, i.e. for 1 random byte in 16.  0xff makes the
        # setup area larger than the file, so QEMU always rejects the header.
        garbage = bytearray(os.urandom(8192))
        garbage[0x1F1] = 0xFF
        garbage[0x202:0x206] = b"\0\0\0\0"  # no "HdrS" boot-protocol magic
        kernel.write_bytes(bytes(garbage))
    cfg = vm_config(tmp_path, kernel=str(kernel), initrd="")
    hv = QemuHypervisor()
    await hv.prepare(cfg)
    assert os.path.isdir(cfg.state_dir)
    with pytest.raises(HypervisorError) as err:
        await hv.start(timeout=30)
    assert "qemu" in str(err.value) and "kernel" in str(err.value)
    pid = hv.vmm_pid()
    assert_nothing_left(cfg, pid)
    await hv.cleanup()
    assert_nothing_left(cfg, pid)
