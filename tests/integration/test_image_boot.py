"""The guest image (vm-images/build.py) builds, is reused, and boots under QEMU TCG.

One boot carries all guest-side assertions (each TCG boot costs ~10 s on a loaded 2-core box):
init finishes, the modules load, the virtio-serial port `agent.channel.0` is visible, the
agent layer's Python imports (google.protobuf + ttrpc) work, and runc runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.support import image as guest_image

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "vm-images" / "build.py"
IMAGE_ROOT = guest_image.root()
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
BOOT_TIMEOUT = 240


def _have_apt() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


needs_tools = pytest.mark.skipif(
    not (os.access(QEMU, os.X_OK) and _have_apt() and os.geteuid() == 0),
    reason="needs root, qemu-system-x86_64, apt-get and dpkg-deb")


def build(*args: str) -> tuple[Path, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(BUILDER), "--print-dir", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return Path(r.stdout.strip().splitlines()[-1]), r.stdout, time.monotonic() - t0


@pytest.fixture(scope="module")
def image() -> Path:
    d, _, _ = build()
    return d


@needs_tools
def test_build_is_reused_and_manifest_complete() -> None:
    # back to back: agent sources edited in between would (rightly) give a new agent layer
    image, _, _ = build()
    d, out, dt = build()
    assert d == image
    assert "up to date" in out
    assert dt < 30, f"warm build took {dt:.1f}s"
    assert (IMAGE_ROOT / "current").resolve() == image.resolve()
    m = json.loads((image / "manifest.json").read_text())
    for name in ("vmlinux", "initramfs.cpio", "agent.cpio"):
        assert (image / name).stat().st_size == m["artifacts"][name]["size"]
    assert (image / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    assert m["runc_no_pivot"] is True
    assert m["kernel"].endswith("-amd64")
    assert m["modules"].index("virtio_ring") < m["modules"].index("virtio_console")
    assert {"runc", "busybox-static", "python3.11-minimal"} <= set(m["packages"])


# The kernel command line the driver passes (vm-images/README.md) + the self-test mode.
CMDLINE = "console=ttyS0 panic=-1 quiet rdinit=/init kata_colo.init=poweroff"


def boot_poweroff(image: Path, tmp: Path) -> tuple[list[tuple[float, str]], int]:
    """Boot the image in poweroff mode; return the console lines with their wall time since
    qemu started, and qemu's exit status."""
    cmd = [QEMU, "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
           "-m", "512M", "-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio",
           "-kernel", str(image / "vmlinux"), "-initrd", str(image / "initramfs.cpio"),
           "-append", CMDLINE,
           "-device", "virtio-serial-pci",
           "-chardev", f"socket,id=ag,path={tmp / 'agent.sock'},server=on,wait=off",
           "-device", "virtserialport,chardev=ag,name=agent.channel.0"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[tuple[float, str]] = []
    timer = threading.Timer(BOOT_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for raw in proc.stdout:
            lines.append((time.monotonic() - t0, raw.decode(errors="replace").rstrip("\r\n")))
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    if time.monotonic() - t0 >= BOOT_TIMEOUT:
        pytest.fail(f"guest did not power off in {BOOT_TIMEOUT}s:\n" +
                    "\n".join(ln for _, ln in lines[-40:]))
    return lines, proc.returncode


@needs_tools
def test_boot_poweroff_selftest(image: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kc-imgboot-"))
    try:
        lines, rc = boot_poweroff(image, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log = "\n".join(ln for _, ln in lines)
    tail = log[-3000:]
    assert rc == 0, tail
    assert "kata-colo-init: modules loaded: " in log, tail
    assert not re.search(r"insmod \S+ failed", log), tail
    assert re.search(r"virtio-ports:.*=agent\.channel\.0\b", log), tail
    assert "kata-colo-init: ready" in log, tail
    assert "kata-colo-selftest: python ok protobuf" in log, tail
    assert "kata-colo-selftest: runc runc version" in log, tail
    assert "kata-colo-init: poweroff" in log, tail
    ready = next(t for t, ln in lines if "kata-colo-init: ready" in ln)
    imp = re.search(r"python import took ([\d.]+) -> ([\d.]+)", log)
    print(f"qemu start -> init ready {ready:.1f}s; python3 -c 'import google.protobuf' "
          f"{float(imp.group(2)) - float(imp.group(1)):.1f}s in the guest; "
          f"qemu exit {lines[-1][0]:.1f}s")
