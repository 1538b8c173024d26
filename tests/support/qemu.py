"""A bare QEMU VM config for driver-level tests (no sandbox): the project's guest image when built,
TCG, a 9p share, one pcie-root-port; and the check that a stopped VM left nothing."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hypervisor.base import SharedDir, VmConfig
from hypervisor.qemu.options import QemuOptions
from tests.support import image

IMAGE_DIR = image.current()
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
MIB = 1 << 20

needs_qemu = pytest.mark.skipif(not os.access(QEMU, os.X_OK), reason=f"{QEMU} not installed")
needs_image = pytest.mark.skipif(
    not (IMAGE_DIR / "manifest.json").exists(),
    reason=f"guest image not built: {IMAGE_DIR}/manifest.json is absent (run vm-images/build.py)")


def image_files() -> tuple[str, str]:
    return image.kernel_and_initrd()


# The guest init powers off when the image carries no agent; "shell" keeps the guest alive.
STAY_UP = "kata_colo.init=shell"


def vm_config(tmp_path: Path, *, balloon: bool = True, pcie_root_ports: int = 1, **kw) -> VmConfig:
    share = tmp_path / "shared"
    share.mkdir(exist_ok=True)
    base = dict(vm_id=f"it-{tmp_path.name[-20:]}", state_dir=str(tmp_path / "vm"),
                kernel="", vcpus=2, memory_mib=512, hypervisor_path=QEMU,
                shared_dirs=(SharedDir("kataShared", str(share)),), kernel_params=STAY_UP,
                options=QemuOptions(accel="tcg", enable_balloon=balloon, pcie_root_ports=pcie_root_ports))
    if (IMAGE_DIR / "manifest.json").exists():
        base["kernel"], base["initrd"] = image_files()
    base.update(kw)
    return VmConfig(**base)


def assert_nothing_left(cfg: VmConfig, pid: int | None) -> None:
    assert not os.path.exists(cfg.state_dir), os.listdir(cfg.state_dir)
    if pid is not None:
        assert not os.path.exists(f"/proc/{pid}"), f"qemu pid {pid} still exists"
