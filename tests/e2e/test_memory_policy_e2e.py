"""kata-colo-resourced's memory policy with a real offline VM: ``ctr run`` through the installed
shim (QEMU/TCG, a 1 GiB balloon VM whose VMM lives under a private offline root), the daemon
watching the host's MemAvailable with watermarks set relative to what this host has free right
now, and a synthetic host memory pressure: a process in its own host memory cgroup holding 2 GiB.

The pressure takes MemAvailable 1 GiB under the low watermark; the daemon shrinks the VM (256 MiB
steps, down to the policy's 512 MiB minimum) within a few seconds. Once the process exits the
node is above the high watermark again and the VM grows back to its 1 GiB. The watermarks keep a
500 MiB margin on each side, so other work on the host moving a few hundred MiB does not change
the outcome. The allocating process and its cgroup are removed whatever happens.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shim.mgmt import client
from shim.resources.qos import cgroupfs, detect_driver
from tests.support import image
from tests.support.containerd import (
    IMAGE,
    RUNTIME,
    STATE_ROOT,
    NoShim,
    product_shim_dir,
    start_containerd,
    stop_containerd,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]
MIB = 1 << 20
GIB = 1 << 30
HOG = 2 * GIB


def meminfo() -> tuple[int, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


def memory_cgroup_root() -> Path:
    mp = cgroupfs.v1_mountpoints(cgroupfs.cgroup_mounts()).get("memory")
    if mp:
        return Path(mp)
    unified = Path("/sys/fs/cgroup")
    if (unified / "cgroup.controllers").exists() and "memory" in (unified / "cgroup.controllers").read_text():
        return unified
    pytest.skip("no memory cgroup controller")


class Hog:
    """A process in a fresh host memory cgroup holding ``size`` bytes of touched memory."""

    def __init__(self, size: int) -> None:
        self.group = memory_cgroup_root() / f"kc-e2e-hog-{secrets.token_hex(3)}"
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.group.mkdir()
        procs = self.group / "cgroup.procs"
        code = ("import sys, time\nb = b'\\x01' * int(sys.argv[1])\nprint('ready', flush=True)\n"
                "time.sleep(600)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.size)], stdout=subprocess.PIPE,
                                     preexec_fn=lambda: procs.write_text(str(os.getpid())))
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        deadline = time.monotonic() + 10
        while self.group.exists():
            try:
                self.group.rmdir()
            except OSError:
                assert time.monotonic() < deadline, f"{self.group} stays busy"
                time.sleep(0.1)


@pytest.fixture(scope="module")
def colo_containerd(tmp_path_factory):
    """A private containerd whose shim boots 1 GiB balloon VMs below a private offline root."""
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")
    kernel, initrd = image.kernel_and_initrd()
    root = f"kc-e2e-memoff-{secrets.token_hex(3)}"
    shipped = (REPO / "shim" / "defaults" / "configuration.toml").read_text()
    text = shipped.replace("\n[colo]\n", f'\n[colo]\ncgroup_root = "{root}"\n', 1).replace(
        "\n[hypervisor.qemu]\n", f'\n[hypervisor.qemu]\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
        f'default_memory = 1024\nenable_balloon = true\nreclaim_guest_freed_memory = true\n', 1)
    conf = tmp_path_factory.mktemp("conf") / "configuration.toml"
    conf.write_text(text)
    old = os.environ.get("KATA_COLO_CONFIG")
    os.environ["KATA_COLO_CONFIG"] = str(conf)
    try:
        shim_dir = product_shim_dir()
    except NoShim as exc:
        pytest.skip(str(exc))
    c = start_containerd([shim_dir])
    try:
        c.import_busybox()
        yield c, root, conf
    finally:
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)
        if old is None:
            os.environ.pop("KATA_COLO_CONFIG", None)
        else:
            os.environ["KATA_COLO_CONFIG"] = old
        detect_driver().remove_tree(root, "")


def target_of(sandbox_id: str) -> tuple[int, int]:
    """(target, actual) bytes from the shim's cheap GET /colo/memory."""
    async def go() -> tuple[int, int]:
        async with client.ShimClient(client.socket_of(sandbox_id, STATE_ROOT), timeout=5) as c:
            doc = await c.json("GET", "/colo/memory")
            return doc["target_bytes"], doc["actual_bytes"]
    return asyncio.run(go())


def wait_for(fn, timeout: float, step: float = 0.1) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def policy_text(root: str, total: int, available: int) -> str:
    """Low watermark 1 GiB under what is available now, high 512 MiB under it."""
    low = 100.0 * (available - HOG // 2) / total
    high = 100.0 * (available - HOG // 4) / total
    return (f'[daemon]\ninterval_ms = 200\nlisten = ""\n[tiers]\noffline = ["{root}"]\n[cpu]\nenabled = false\n'
            f'[memory]\nlow_watermark_percent = {low:.4f}\nhigh_watermark_percent = {high:.4f}\n'
            f'psi_some_avg10 = 0\nstep_mib = 256\ncooldown_s = 1\nmin_mib = 512\nsample_interval_ms = 250\n')


def test_host_memory_pressure_shrinks_the_offline_vm_and_its_end_grows_it_back(colo_containerd, tmp_path):
    c, root, conf = colo_containerd
    name = f"kc-mempol-{uuid.uuid4().hex[:6]}"
    hog = Hog(HOG)
    daemon = None
    log_path = tmp_path / "resourced.log"
    try:
        c.ctr("run", "-d", "--runtime", RUNTIME, "--cgroup", "",
              "--annotation", "io.katacontainers.colo.vcpu-priorities=low:1", IMAGE, name, "sleep", "600")
        assert target_of(name) == (GIB, GIB)
        total, available = meminfo()
        if available < HOG + 2 * GIB:
            pytest.skip(f"only {available // MIB} MiB available: no room for a {HOG // MIB} MiB pressure")
        policy = tmp_path / "resourced.toml"
        policy.write_text(policy_text(root, total, available))
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "resourced", "--policy", str(policy), "--kata-config",
                                       str(conf)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                                      stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2)  # a few rounds without pressure: nothing moves
        assert daemon.poll() is None, log_path.read_text()
        assert target_of(name) == (GIB, GIB), log_path.read_text()

        hog.start()
        shrunk = wait_for(lambda: target_of(name)[1] <= 768 * MIB, 15)
        assert shrunk is not None, log_path.read_text()
        floor = wait_for(lambda: target_of(name) == (512 * MIB, 512 * MIB), 20)
        assert floor is not None, log_path.read_text()
        print(f"pressure on: first step reached in {shrunk:.2f}s, the policy's 512 MiB in {shrunk + floor:.2f}s")
        time.sleep(1.5)  # still under pressure: the policy's minimum holds
        assert target_of(name) == (512 * MIB, 512 * MIB)

        hog.stop()
        back = wait_for(lambda: target_of(name) == (GIB, GIB), 30)
        assert back is not None, log_path.read_text()
        print(f"pressure off: back to 1024 MiB in {back:.2f}s")
        text = log_path.read_text()
        assert "memory: pressure: available" in text and "memory: relaxed: available" in text, text
    finally:
        hog.stop()
        if daemon is not None:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=15) == 0, log_path.read_text()
        c.ctr("task", "kill", "-s", "KILL", name, check=False)
        deadline = time.monotonic() + 30
        while c.ctr("task", "delete", name, check=False).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        c.ctr("container", "rm", name, check=False)
    assert not hog.group.exists()
