"""A private containerd 1.6 (own root/state/sockets under a temp dir) and helpers to drive it
with ctr, for e2e tests (their fixtures are in tests/e2e/conftest.py) and benches. Uses
scripts/private_containerd.sh and scripts/make_oci_image.py. The same socket serves CRI
(runtime.v1); its CNI network (bridge + host-local, /usr/lib/cni) and the pause image are set up
by private_containerd.sh. Also: what a kata-colo sandbox may leave on the host
(:func:`assert_nothing_left`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shim.bootstrap import socket_path

REPO = Path(__file__).resolve().parents[2]
FAKE_BIN = REPO / "tests" / "fakes" / "bin"
IMAGE = "docker.io/library/busybox:kata-colo"
RUNTIME = "io.containerd.kata-colo.v2"
CRI_NAMESPACE = "k8s.io"
CNI_BIN_DIR = Path("/usr/lib/cni")
STATE_ROOT = Path("/run/kata-colo/sbs")

if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))


class NoShim(Exception):
    """The product shim is not installed (make setup)."""


@dataclass
class Containerd:
    dir: Path
    namespace: str = "default"

    @property
    def address(self) -> str:
        return str(self.dir / "containerd.sock")

    @property
    def ttrpc_address(self) -> str:
        return self.address + ".ttrpc"

    def ctr(self, *args: str, input: bytes | None = None, timeout: float = 180, check: bool = True,
            ) -> subprocess.CompletedProcess[bytes]:
        cmd = ["ctr", "-a", self.address, "-n", self.namespace, *args]
        res = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} → {res.returncode}\nstdout: {res.stdout!r}\n"
                                 f"stderr: {res.stderr!r}\ncontainerd log:\n{self.log_tail()}")
        return res

    @property
    def cni_bridge(self) -> str:
        """The bridge of this instance's CNI network (kcbr…)."""
        return (self.dir / "cni" / "bridge").read_text().strip()

    @property
    def cni_subnet(self) -> str:
        conf = json.loads((self.dir / "cni" / "net.d" / "10-kata-colo.conflist").read_text())
        subnet: str = conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
        return subnet

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.dir / "containerd.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def import_busybox(self, ref: str = IMAGE) -> str:
        import make_oci_image

        tar = self.dir / "busybox.tar"
        if not tar.exists():
            make_oci_image.build(str(tar), ref)
        self.ctr("image", "import", str(tar))
        return ref


def start_containerd(path_prepend: list[str]) -> Containerd:
    d = Path(tempfile.mkdtemp(prefix="kc-ctrd-", dir="/tmp"))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([*path_prepend, os.path.dirname(sys.executable), env.get("PATH", "")])
    subprocess.run(["bash", str(REPO / "scripts" / "private_containerd.sh"), "start", str(d)], env=env,
                   check=True, timeout=60)
    return Containerd(d)


def stop_containerd(c: Containerd) -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "private_containerd.sh"), "stop", str(c.dir)], timeout=60)
    shutil.rmtree(c.dir, ignore_errors=True)


def shim_processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "containerd-shim-kata-colo-v2"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line]


def product_shim_dir() -> str:
    """A directory holding only the installed product shim (make setup links it into
    /usr/local/bin); put first on containerd's PATH so nothing else can shadow it. NoShim when
    it is not installed."""
    target = shutil.which("containerd-shim-kata-colo-v2", path="/usr/local/bin") or shutil.which(
        "containerd-shim-kata-colo-v2")
    if target is None:
        raise NoShim("containerd-shim-kata-colo-v2 is not installed (run make setup)")
    d = Path(tempfile.mkdtemp(prefix="kc-shimbin-", dir="/tmp"))
    os.symlink(os.path.realpath(target), d / "containerd-shim-kata-colo-v2")
    return str(d)


def qemu_pids(sandbox_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{STATE_ROOT}/{sandbox_id}/"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def assert_nothing_left(c: Containerd, sandbox_id: str, timeout: float = 20) -> None:
    """No qemu, state dir, mount or shim socket of ``sandbox_id`` (waits up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leftovers = {
            "qemu": qemu_pids(sandbox_id),
            "state": (STATE_ROOT / sandbox_id).exists(),
            "mounts": [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if f"/{sandbox_id}/" in ln],
            "shim socket": [p for p in [socket_path(c.address, "default", sandbox_id)] if os.path.exists(p)],
        }
        if not any(leftovers.values()):
            return
        time.sleep(0.3)
    raise AssertionError(f"left behind for {sandbox_id}: {leftovers}")
