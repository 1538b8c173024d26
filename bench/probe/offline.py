"""The offline side of the interference bench: kata-colo VMs started by ``ctr run`` through the
real shim, each running ``worker`` (one busy thread per vCPU, a cumulative work-unit counter
printed twice a second), plus the host-side controls the bench switches between modes:

* :class:`Freezer` — the v1 freezer cgroup stops a VM's QEMU completely (zero host CPU), so
  "online alone" and "one VM" modes need no reboot;
* :class:`Knobs` — the scheduling policy under test, written straight into the VM's groups (the
  same files the shim writes: ``<root>``, ``<root>/<id>/vcpu-<prio>``, ``<root>/<id>/vmm``, and
  SCHED_IDLE per vCPU TID).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from shim.resources.qos import cgroupfs
from shim.resources.qos.driver import CgroupDriver
from shim.resources.qos.manager import set_thread_idle
from shim.resources.qos.model import CpuKnobs, format_cpuset

WORKER_IMAGE = "localhost/kata-colo/bench-worker:1"
RUNTIME = "io.containerd.kata-colo.v2"
FREEZER = "/sys/fs/cgroup/freezer"
NEUTRAL = CpuKnobs(cpu_idle=False, cpu_shares=1024, cfs_quota_us=-1)


def worker_image_tar(worker: Path, out: Path) -> None:
    """A one-layer OCI image holding only /worker (static), importable with ``ctr image import``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import make_oci_image

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("dev", "proc", "sys", "tmp", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        data = worker.read_bytes()
        info = tarfile.TarInfo("worker")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    make_oci_image.write_image(str(out), WORKER_IMAGE, raw.getvalue(), {"Cmd": ["/worker"]})


@dataclass
class OfflineVM:
    """One ``ctr run`` (foreground: its stdout is the worker's counter)."""

    name: str
    address: str
    vcpus: int = 2
    priorities: str = "low:2"
    proc: subprocess.Popen[bytes] | None = None
    points: list[tuple[float, int]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start(self, iters: int = 20000, timeout: float = 120.0) -> None:
        cmd = ["ctr", "-a", self.address, "run", "--rm", "--runtime", RUNTIME, "--cgroup", "",
               "--annotation", f"io.katacontainers.config.hypervisor.default_vcpus={self.vcpus}"]
        if self.priorities:
            cmd += ["--annotation", f"io.katacontainers.colo.vcpu-priorities={self.priorities}"]
        cmd += [WORKER_IMAGE, self.name, "/worker", str(iters)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while len(self.points) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"VM {self.name} did not start its worker: {err[-2000:]}")
            time.sleep(0.2)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            parts = raw.split()
            if len(parts) == 2 and parts[0] == b"units":
                self.points.append((time.monotonic(), int(parts[1])))

    def stop(self) -> None:
        subprocess.run(["ctr", "-a", self.address, "task", "kill", "-s", "KILL", self.name], capture_output=True,
                       timeout=30)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["ctr", "-a", self.address, "container", "rm", self.name], capture_output=True, timeout=30)

    def qemu_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"qemu-system.*/sbs/{self.name}/"], capture_output=True,
                             text=True).stdout.split()
        if len(out) != 1:
            raise RuntimeError(f"VM {self.name}: expected one qemu, found {out}")
        return int(out[0])


class Freezer:
    """A v1 freezer group per VM (QEMU's threads only; the shim keeps running)."""

    def __init__(self, name: str) -> None:
        self.path = Path(FREEZER) / name
        self.path.mkdir(exist_ok=True)

    def add(self, pid: int) -> None:
        cgroupfs.write_value(str(self.path / "cgroup.procs"), pid)

    def set(self, frozen: bool) -> None:
        want = "FROZEN" if frozen else "THAWED"
        cgroupfs.write_value(str(self.path / "freezer.state"), want)
        deadline = time.monotonic() + 10
        while cgroupfs.read_value(str(self.path / "freezer.state")) != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path} did not become {want}")
            time.sleep(0.01)

    def remove(self) -> None:
        if not self.path.exists():
            return
        self.set(False)
        for pid in cgroupfs.read_ints(str(self.path / "cgroup.procs")):
            cgroupfs.try_write(f"{FREEZER}/cgroup.procs", pid)
        os.rmdir(self.path)


@dataclass(frozen=True)
class Policy:
    """One scheduling setup of the offline VMs (knobs None = neutral)."""

    name: str
    root: CpuKnobs = NEUTRAL
    vcpu: CpuKnobs = NEUTRAL
    vmm: CpuKnobs = NEUTRAL
    sched_idle: bool = False
    resourced: str = ""  # "" or the suppression policy for kata-colo-resourced: cpuset | cfs_quota


class Knobs:
    """Apply a Policy to the offline root and every VM's groups under it."""

    def __init__(self, driver: CgroupDriver, root: str) -> None:
        self.driver = driver
        self.root = root

    def groups(self) -> tuple[list[str], list[str]]:
        vcpu, vmm = [], []
        for sb in self.driver.children(self.root):
            for g in self.driver.children(sb):
                (vcpu if g.rsplit("/", 1)[-1].startswith("vcpu-") else vmm).append(g)
        return vcpu, vmm

    def vcpu_tids(self) -> list[int]:
        return [t for g in self.groups()[0] for t in self.driver.threads(g)]

    def apply(self, policy: Policy) -> None:
        d = self.driver
        vcpu_groups, vmm_groups = self.groups()
        all_cpus = format_cpuset(cgroupfs.online_cpus())
        # back to neutral first (cpu.idle=1 refuses shares; children first for cpusets)
        for g in [*vcpu_groups, *vmm_groups, self.root]:
            d.set_knobs(g, CpuKnobs(cpu_idle=False) if d.supports_idle(g) else CpuKnobs())
        for g in [self.root, *[s for s in d.children(self.root)], *vcpu_groups, *vmm_groups]:
            d.set_knobs(g, CpuKnobs(cpuset=all_cpus, cfs_quota_us=-1))
        for g, knobs in [(self.root, policy.root), *[(g, policy.vcpu) for g in vcpu_groups],
                         *[(g, policy.vmm) for g in vmm_groups]]:
            d.set_knobs(g, knobs)
        for tid in self.vcpu_tids():
            set_thread_idle(tid, policy.sched_idle)
