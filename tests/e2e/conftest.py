"""A private containerd 1.6 per test module (own root/state/sockets under a temp dir) and
helpers to drive it with ctr. Uses scripts/private_containerd.sh and scripts/make_oci_image.py.
The same socket serves CRI (runtime.v1); its CNI network (bridge + host-local, /usr/lib/cni) and
the pause image are set up by private_containerd.sh."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_BIN = REPO / "tests" / "fakes" / "bin"
IMAGE = "docker.io/library/busybox:kata-colo"
RUNTIME = "io.containerd.kata-colo.v2"
CRI_NAMESPACE = "k8s.io"
CNI_BIN_DIR = Path("/usr/lib/cni")

sys.path.insert(0, str(REPO / "scripts"))


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
        return conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]

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


@pytest.fixture(scope="module")
def fake_containerd():
    """containerd whose kata-colo runtime is the real shim CLI with the TEST host backend."""
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")
    c = start_containerd([str(FAKE_BIN)])
    c.import_busybox()
    yield c
    stop_containerd(c)


def product_shim_dir() -> str:
    """A directory holding only the installed product shim (make setup links it into
    /usr/local/bin); put first on containerd's PATH so nothing else can shadow it."""
    d = Path(tempfile.mkdtemp(prefix="kc-shimbin-", dir="/tmp"))
    target = shutil.which("containerd-shim-kata-colo-v2", path="/usr/local/bin") or shutil.which(
        "containerd-shim-kata-colo-v2")
    if target is None:
        pytest.skip("containerd-shim-kata-colo-v2 is not installed (run make setup)")
    os.symlink(os.path.realpath(target), d / "containerd-shim-kata-colo-v2")
    return str(d)


@pytest.fixture(scope="module")
def kata_containerd():
    """containerd with the real kata-colo runtime (VMs under QEMU) and the busybox image."""
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")
    if not Path("/var/lib/kata-colo/images/current/manifest.json").exists():
        pytest.skip("guest image not built (python3 vm-images/build.py)")
    shim_dir = product_shim_dir()
    c = start_containerd([shim_dir])
    c.import_busybox()
    yield c
    stop_containerd(c)
    shutil.rmtree(shim_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cri_containerd():
    """containerd whose CRI plugin runs pods with handler ``kata-colo`` (the real shim, VMs under
    QEMU) on a private CNI bridge; busybox imported into the ``k8s.io`` namespace."""
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")
    if not Path("/var/lib/kata-colo/images/current/manifest.json").exists():
        pytest.skip("guest image not built (python3 vm-images/build.py)")
    if not all((CNI_BIN_DIR / p).exists() for p in ("bridge", "host-local", "loopback")):
        pytest.skip("CNI plugins missing (apt install containernetworking-plugins)")
    shim_dir = product_shim_dir()
    c = start_containerd([shim_dir])
    c.namespace = CRI_NAMESPACE
    try:
        c.import_busybox()
    except BaseException:
        stop_containerd(c)
        raise
    yield c
    stop_containerd(c)
    shutil.rmtree(shim_dir, ignore_errors=True)
