"""Where the guest image is: ``$KATA_COLO_IMAGE_DIR`` (a helper's own build, see
vm-images/build.py) or the shared ``/var/lib/kata-colo/images``; ``current`` links the image
everyone boots. A test that boots the driver directly uses :func:`kernel_and_initrd`; through
the shim the configuration decides (``KATA_COLO_CONFIG``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_ROOT = "/var/lib/kata-colo/images"
ENV = "KATA_COLO_IMAGE_DIR"


def root() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_ROOT)


def current() -> Path:
    return root() / "current"


def manifest_path() -> Path:
    return current() / "manifest.json"


def built() -> bool:
    return manifest_path().exists()


def manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest_path().read_text())
    return data


def kernel_and_initrd() -> tuple[str, str]:
    m = manifest()
    return str(current() / m.get("vmlinux", "vmlinux")), str(current() / m.get("initrd", "initramfs.cpio"))


def overridden() -> bool:
    """True when $KATA_COLO_IMAGE_DIR names another image than the configuration's default."""
    return bool(os.environ.get(ENV))


SKIP_REASON = f"guest image not built ({manifest_path()} is absent: run vm-images/build.py)"
