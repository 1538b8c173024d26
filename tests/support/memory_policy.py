"""The memory policy on a real host, for its e2e test and bench: a private containerd whose shim
boots 1 GiB balloon VMs (free page reporting on) below a private offline root, an offline VM run
by ``ctr``, kata-colo-resourced as a process with a policy whose watermarks sit relative to what
this host has available now, and a synthetic host memory pressure — a process in its own host
memory cgroup holding touched memory. Everything is removed on exit, whatever happens (the
allocating process, its cgroup, the VM, containerd, the offline root)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resourced.policies.memory_sample import memory_mount
from shim.mgmt import client
from shim.resources.qos import detect_driver
from tests.support import image
from tests.support.containerd import (
    IMAGE,
    RUNTIME,
    STATE_ROOT,
    Containerd,
    product_shim_dir,
    start_containerd,
    stop_containerd,
)

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30


def meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of the host in bytes."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


def memory_cgroup_root() -> Path | None:
    found = memory_mount()
    return Path(found[0]) if found else None


class Hog:
    """A process in a fresh host memory cgroup holding ``size`` bytes of touched memory."""

    def __init__(self, size: int) -> None:
        root = memory_cgroup_root()
        if root is None:
            raise RuntimeError("no memory cgroup controller on this host")
        self.group = root / f"kc-hog-{secrets.token_hex(3)}"
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        """Returns once the memory is allocated and touched (``wait=False``: at once; then
        :meth:`wait_ready`)."""
        self.group.mkdir()
        procs = self.group / "cgroup.procs"
        code = "import sys, time\nb = b'\\x01' * int(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(600)\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.size)], stdout=subprocess.PIPE,
                                     preexec_fn=lambda: procs.write_text(str(os.getpid())))
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the memory hog died before allocating")

    def stop(self) -> None:
        """Kill the process and remove its cgroup (idempotent)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        deadline = time.monotonic() + 10
        while self.group.exists():
            try:
                self.group.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@dataclass
class OfflineVm:
    containerd: Containerd
    root: str          # the private offline root (the policy's [tiers] offline)
    conf: Path         # the shim configuration (kata-colo-resourced --kata-config)
    name: str          # container = sandbox id

    def view(self) -> dict[str, Any]:
        """The shim's cheap GET /colo/memory."""
        async def go() -> dict[str, Any]:
            async with client.ShimClient(client.socket_of(self.name, STATE_ROOT), timeout=5) as c:
                doc: dict[str, Any] = await c.json("GET", "/colo/memory")
                return doc
        return asyncio.run(go())

    def memory(self) -> tuple[int, int]:
        """(target, actual) bytes."""
        doc = self.view()
        return int(doc["target_bytes"]), int(doc["actual_bytes"])

    def resizing(self) -> bool:
        """A resize (the policy's PUT) is under way."""
        return self.view().get("resizing_to") is not None

    def resize(self, target: int) -> float:
        """PUT /colo/memory directly (what the policy does): seconds until the size is reached."""
        async def go() -> float:
            async with client.ShimClient(client.socket_of(self.name, STATE_ROOT), timeout=120) as c:
                t0 = time.monotonic()
                await c.json("PUT", "/colo/memory", {"target": target})
                return time.monotonic() - t0
        return asyncio.run(go())


@contextlib.contextmanager
def offline_vm(memory_mib: int = 1024) -> Iterator[OfflineVm]:
    """A private containerd and one ``ctr run`` VM (busybox ``sleep``) below a private offline root."""
    kernel, initrd = image.kernel_and_initrd()
    root = f"kc-memoff-{secrets.token_hex(3)}"
    shipped = (REPO / "shim" / "defaults" / "configuration.toml").read_text()
    text = shipped.replace("\n[colo]\n", f'\n[colo]\ncgroup_root = "{root}"\n', 1).replace(
        "\n[hypervisor.qemu]\n", f'\n[hypervisor.qemu]\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
        f'default_memory = {memory_mib}\nenable_balloon = true\nreclaim_guest_freed_memory = true\n', 1)
    confdir = Path(tempfile.mkdtemp(prefix="kc-mempol-"))
    conf = confdir / "configuration.toml"
    conf.write_text(text)
    old = os.environ.get("KATA_COLO_CONFIG")
    os.environ["KATA_COLO_CONFIG"] = str(conf)
    shim_dir = ""
    c: Containerd | None = None
    name = f"kc-mempol-{uuid.uuid4().hex[:6]}"
    try:
        shim_dir = product_shim_dir()
        c = start_containerd([shim_dir])
        c.import_busybox()
        c.ctr("run", "-d", "--runtime", RUNTIME, "--cgroup", "",
              "--annotation", "io.katacontainers.colo.vcpu-priorities=low:1", IMAGE, name, "sleep", "3600")
        yield OfflineVm(c, root, conf, name)
    finally:
        if c is not None:
            c.ctr("task", "kill", "-s", "KILL", name, check=False)
            deadline = time.monotonic() + 30
            while c.ctr("task", "delete", name, check=False).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            c.ctr("container", "rm", name, check=False)
            stop_containerd(c)
        if shim_dir:
            shutil.rmtree(shim_dir, ignore_errors=True)
        if old is None:
            os.environ.pop("KATA_COLO_CONFIG", None)
        else:
            os.environ["KATA_COLO_CONFIG"] = old
        detect_driver().remove_tree(root, "")
        shutil.rmtree(confdir, ignore_errors=True)


def watermarks(total: int, available: int, hog: int) -> tuple[float, float]:
    """(low %, high %): low ``hog``/2 under what is available now, high 3/8 ``hog`` under it. A
    ``hog`` takes the node ``hog``/2 under the low watermark (the VM giving back up to ``hog``/4
    leaves a ``hog``/4 margin); its end puts the node 3/8 ``hog`` over the high one, room for a
    growth step (the policy grows only when the step fits over the high watermark) with margin."""
    return 100.0 * (available - hog // 2) / total, 100.0 * (available - 3 * hog // 8) / total


def policy_text(root: str, low: float, high: float, *, step_mib: int = 256, min_mib: int = 512,
                cooldown_s: float = 1.0) -> str:
    return (f'[daemon]\ninterval_ms = 200\nlisten = ""\n[tiers]\noffline = ["{root}"]\n[cpu]\nenabled = false\n'
            f'[memory]\nlow_watermark_percent = {low:.4f}\nhigh_watermark_percent = {high:.4f}\n'
            f'psi_some_avg10 = 0\nstep_mib = {step_mib}\ncooldown_s = {cooldown_s}\nmin_mib = {min_mib}\n'
            f'sample_interval_ms = 250\n')


class Resourced:
    """kata-colo-resourced as a process (its log in a file: a full pipe would stall it)."""

    def __init__(self, policy: Path, kata_config: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "resourced", "--policy", str(policy),
                                          "--kata-config", str(kata_config)],
                                         env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=f,
                                         stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def wait_for(fn, timeout: float, step: float = 0.05) -> float | None:  # type: ignore[no-untyped-def]
    """Seconds until ``fn()`` is true (None after ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        time.sleep(step)
    return None
