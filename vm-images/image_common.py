"""Shared plumbing of the image builder: paths, the progress log, subprocess and file helpers."""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE_DIR = Path(os.environ.get("KATA_COLO_IMAGE_DIR", "/var/lib/kata-colo/images"))
FORMAT_VERSION = 1

# Runc cannot pivot_root out of an initramfs root; the agent must pass --no-pivot.
RUNC_NO_PIVOT = True

STEP_T0 = time.monotonic()
QUIET = False  # set by build.py --quiet


def say(msg: str) -> None:
    if not QUIET:
        print(f"[image {time.monotonic() - STEP_T0:6.1f}s] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
