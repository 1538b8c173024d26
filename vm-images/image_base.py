"""Base layer: vmlinux + base.cpio (kernel modules, userland, /init), cached under
.base/<base_key>/ and keyed by the package versions and the builder's own sources."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from image_common import FORMAT_VERSION, HERE, RUNC_NO_PIVOT, say, tree_size
from image_cpio import Cpio
from image_debs import USER_PACKAGES, unpack
from image_kernel import build_modules, extract_vmlinux, unpack_kernel
from image_userland import busybox_links, check_needed, compile_pyc, guest_python, prune, skeleton

# Everything that decides the base layer's content: build.py, every image_*.py module (sorted
# by name) and init.sh. Their sources are hashed into base_key in this order.
BUILDER_FILES = [HERE / "build.py", *sorted(HERE.glob("image_*.py")), HERE / "init.sh"]


def base_key(pkgs: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION}\n".encode())
    for p in sorted(pkgs):
        h.update(f"{p}={pkgs[p]}\n".encode())
    for f in BUILDER_FILES:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build_base(key: str, pkgs: dict[str, str], debs: dict[str, Path], dest: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f".base-{key}-", dir=dest.parent))
    try:
        kpkg = next(p for p in pkgs if p.startswith("linux-image-"))
        kver = kpkg[len("linux-image-"):]
        say(f"kernel: unpacking {kpkg} {pkgs[kpkg]}")
        kdir = work / "kernel"
        kdir.mkdir()
        unpack_kernel(debs[kpkg], kver, kdir)
        say("kernel: extracting vmlinux (xz payload of the bzImage)")
        extract_vmlinux(kdir / f"boot/vmlinuz-{kver}", work / "vmlinux")

        root = work / "rootfs"
        root.mkdir()
        say("modules: resolving dependencies from modinfo, decompressing")
        order = build_modules(kdir / f"lib/modules/{kver}", root / "lib/modules/kata-colo")
        say(f"modules: {len(order)}: {' '.join(order)}")
        shutil.rmtree(kdir)

        for p in USER_PACKAGES:
            unpack(debs[p], root)
        say(f"userland: unpacked {len(USER_PACKAGES)} packages ({tree_size(root) >> 20} MiB)")
        prune(root)
        guest = {"runc_no_pivot": RUNC_NO_PIVOT, "runc": "/usr/sbin/runc", "crun": "/usr/bin/crun", "kernel": kver,
                 "python": "/usr/bin/python3", "pythonpath": "/opt/kata-colo",
                 "base_key": key, "modules": order}
        skeleton(root, guest)
        nlinks = busybox_links(root)
        say(f"userland: pruned to {tree_size(root) >> 20} MiB, {nlinks} busybox applet links")
        problems = check_needed(root)
        for pr in problems:
            say(f"  WARNING unresolved library: {pr}")
        say("python: precompiling stdlib (unchecked-hash pyc)")
        compile_pyc(root, root, root / "usr/lib/python3.11", sourceless=True)
        probe = "import asyncio, json, struct, socket, signal, hashlib, ctypes, lzma, bz2, zlib; print('ok')"
        r = subprocess.run(guest_python(root) + ["-I", "-c", probe],
                           env=dict(os.environ, PYTHONHOME=str(root / "usr")), capture_output=True, text=True)
        if r.stdout.strip() != "ok":
            raise SystemExit(f"guest python self-check failed: {r.stderr}")

        say("cpio: writing base.cpio")
        with open(work / "base.cpio", "wb") as f:
            c = Cpio(f)
            c.add_dir("dev")
            c.add_chardev("dev/console", 5, 1)
            c.add_chardev("dev/null", 1, 3, 0o666)
            nfiles = c.add_tree(root)
            c.trailer()
        meta = {"key": key, "kernel": kver, "modules": order, "packages": pkgs,
                "base_cpio_entries": nfiles, "unresolved_libs": problems,
                "runc_no_pivot": RUNC_NO_PIVOT, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (work / "base.json").write_text(json.dumps(meta, indent=1) + "\n")
        # rootfs stays: its python compiles the agent layer's pycs
        os.chmod(work, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)
        return meta
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
