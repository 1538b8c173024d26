#!/usr/bin/env python3
"""Build the kata-colo guest image (kernel + initramfs) from Debian packages.

Two layers:
  base   vmlinux + base.cpio (busybox, Debian python3.11, runc, kernel modules, /init).
         Cache key = package versions + hash of this directory's builder files. Built once.
  agent  agent.cpio (/opt/kata-colo: ttrpc, proto, agent_api, shim errors, google.protobuf).
         Cache key = base key + content hash. Rebuilt in seconds when the code changes.
The final initramfs.cpio is base.cpio + agent.cpio concatenated (the kernel unpacks
concatenated newc archives in order). Layout and kernel command line: vm-images/README.md.

Usage: python3 vm-images/build.py [--force] [--compress none|gzip] [--quiet]
Env:   KATA_COLO_IMAGE_DIR (default /var/lib/kata-colo/images),
       KATA_COLO_DEB_CACHE (default /var/cache/kata-colo/debs).
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The builder's modules (image_*.py) live next to this file; vm-images is not a package, so
# make them importable also when build.py is loaded by path (importlib) rather than run.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import image_common  # noqa: E402
from image_agent import agent_key, agent_sources, build_agent, ensure_protos  # noqa: E402
from image_base import base_key, build_base  # noqa: E402
from image_common import FORMAT_VERSION, IMAGE_DIR, RUNC_NO_PIVOT, say, sha256_file  # noqa: E402
from image_debs import download, resolve_packages  # noqa: E402
from image_rootfs import build_boot_initrd, build_rootfs_image  # noqa: E402

KEEP_IMAGES = 3


def atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def gc(keep: set[str]) -> None:
    finals = sorted((d for d in IMAGE_DIR.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and not d.is_symlink() and (d / "manifest.json").exists()),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    kept = {d.name for d in finals[:KEEP_IMAGES]} | keep
    for d in finals:
        if d.name not in kept:
            say(f"gc: removing old image {d.name}")
            shutil.rmtree(d, ignore_errors=True)
    bases_used = {n.split("-")[0] for n in kept}
    bdir = IMAGE_DIR / ".base"
    if bdir.is_dir():
        for b in bdir.iterdir():
            if b.name not in bases_used and not b.name.startswith("."):
                say(f"gc: removing old base {b.name}")
                shutil.rmtree(b, ignore_errors=True)
            elif b.name.startswith(".base-") and time.time() - b.stat().st_mtime > 3600:
                shutil.rmtree(b, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild the base layer too")
    ap.add_argument("--compress", choices=["none", "gzip"], default="none",
                    help="initramfs compression (default none: fastest boot under TCG)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--print-dir", action="store_true", help="print the image directory at the end")
    args = ap.parse_args(argv)
    image_common.QUIET = args.quiet
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    (IMAGE_DIR / ".base").mkdir(exist_ok=True)
    with open(IMAGE_DIR / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        t0 = time.monotonic()
        pkgs = resolve_packages()
        bkey = base_key(pkgs)
        base_dir = IMAGE_DIR / ".base" / bkey
        if args.force or not (base_dir / "base.json").exists():
            debs = download(pkgs)
            say(f"base {bkey}: building")
            build_base(bkey, pkgs, debs, base_dir)
            say(f"base {bkey}: done")
        else:
            say(f"base {bkey}: up to date")
        base_meta = json.loads((base_dir / "base.json").read_text())

        ensure_protos()
        files = agent_sources()
        akey = agent_key(bkey, files) + ("-gz" if args.compress == "gzip" else "")
        name = f"{bkey}-{akey}"
        final = IMAGE_DIR / name
        if (final / "manifest.json").exists() and not args.force:
            say(f"image {name}: up to date")
        else:
            stage = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=IMAGE_DIR))
            try:
                n, import_errors = build_agent(base_dir, files, stage / "agent.cpio", keep_tree=stage / ".agent-tree")
                say(f"agent layer: {n} entries, {(stage / 'agent.cpio').stat().st_size >> 10} KiB")
                size = build_rootfs_image(base_dir / "rootfs", stage / ".agent-tree", stage / "rootfs.erofs")
                shutil.rmtree(stage / ".agent-tree")
                say(f"root image: rootfs.erofs {size >> 20} MiB")
                build_boot_initrd(base_dir / "rootfs", stage / "initrd-boot.cpio")
                os.link(base_dir / "vmlinux", stage / "vmlinux")
                with open(stage / "initramfs.cpio", "wb") as out:
                    for part in (base_dir / "base.cpio", stage / "agent.cpio"):
                        with open(part, "rb") as f:
                            if args.compress == "gzip":
                                out.write(gzip.compress(f.read(), compresslevel=6, mtime=0))
                            else:
                                shutil.copyfileobj(f, out, 1 << 20)
                artifacts = {}
                for a in ["vmlinux", "initramfs.cpio", "agent.cpio", "rootfs.erofs", "initrd-boot.cpio"]:
                    artifacts[a] = {"sha256": sha256_file(stage / a), "size": (stage / a).stat().st_size}
                manifest = {
                    "format": FORMAT_VERSION, "key": name, "base_key": bkey, "agent_key": akey,
                    "kernel": base_meta["kernel"], "vmlinux": "vmlinux", "initrd": "initramfs.cpio",
                    "initrd_compression": args.compress, "boot": "pvh",
                    "kernel_cmdline": "console=ttyS0 panic=-1 quiet rdinit=/init",
                    # the read-only root alternative: image = rootfs.erofs, initrd = initrd-boot.cpio
                    "rootfs_image": "rootfs.erofs", "boot_initrd": "initrd-boot.cpio",
                    "modules": base_meta["modules"], "packages": base_meta["packages"],
                    "artifacts": artifacts, "runc_no_pivot": RUNC_NO_PIVOT,
                    "agent_import_errors": import_errors,
                    "guest": {"init": "/init", "python": "/usr/bin/python3", "pythonpath": "/opt/kata-colo",
                              "runc": "/usr/sbin/runc", "agent": "python3 -m agent_api.agent",
                              "agent_present": any(d == "agent_api/agent/__main__.py" for d, _ in files)},
                    "base_built": base_meta["built"],
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                (stage / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
                os.chmod(stage, 0o755)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(stage, final)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            say(f"image {name}: built")
        if args.compress == "none":
            atomic_symlink(name, IMAGE_DIR / "current")
            gc({name})
        os.utime(final)
        current = os.readlink(IMAGE_DIR / "current") if (IMAGE_DIR / "current").is_symlink() else "-"
        say(f"ready: {final} (current -> {current}) "
            f"in {time.monotonic() - t0:.1f}s")
        if args.print_dir:
            print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
