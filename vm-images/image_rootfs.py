"""The guest as a read-only root image: ``rootfs.erofs`` + a small ``initrd-boot.cpio``.

With the initramfs root every VM carries its whole userland (Python, runc, crun, libraries, the
agent: ~45 MiB) in guest RAM twice over — the initrd QEMU places in guest memory and the tmpfs
the kernel unpacks it into — plus QEMU's own copy and mapping of the initrd file. With a root
image the guest reads only the files it uses, through virtio-blk, into its page cache (which
the guest can drop), and the boot initrd is just busybox, the kernel modules and ``/init``.

- ``rootfs.erofs``: the base root tree + the agent layer (``/opt/kata-colo``), uncompressed
  EROFS (decompression is slow under TCG), with ``/.kata-colo-image`` marking it;
- ``initrd-boot.cpio``: ``/init`` (init.sh), busybox-static with its applet links, the modules
  mounting the image needs (:data:`BOOT_MODULES`). Booted with ``root=/dev/vda`` (the driver's
  ``image`` disk), init loads them, mounts the image read-only and switch_roots into it, where
  the same init.sh runs the usual steps (tmpfs /run, /tmp, /dev/shm; cgroup2; the rest of the
  modules; the agent).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from image_common import HERE, run, say
from image_cpio import Cpio

IMAGE_MARKER = ".kata-colo-image"
#: What mounting the root image needs (in load.order's order); init.sh loads the rest from the
#: image after switch_root.
BOOT_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
                "virtio_blk", "crc32c_generic", "libcrc32c", "erofs")


def build_rootfs_image(base_root: Path, agent_cpio_tree: Path, out: Path) -> int:
    """EROFS of ``base_root`` with ``agent_cpio_tree`` (the agent layer's tree) on top."""
    if shutil.which("mkfs.erofs") is None:
        raise SystemExit("mkfs.erofs not found (apt install erofs-utils)")
    work = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=out.parent))
    try:
        tree = work / "root"
        run(["cp", "-a", "--reflink=auto", str(base_root), str(tree)])
        run(["cp", "-a", f"{agent_cpio_tree}/.", str(tree)])
        (tree / IMAGE_MARKER).write_text("kata-colo read-only root image\n")
        # reproducible: fixed timestamps and UUID, no compression (slow to read under TCG)
        run(["mkfs.erofs", "--quiet", "-T0", "-U00000000-0000-0000-0000-000000000000",
             "--all-root", str(out), str(tree)])
        return out.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_boot_initrd(base_root: Path, out: Path) -> int:
    """busybox + modules + /init: just enough to mount the root image."""
    work = Path(tempfile.mkdtemp(prefix=".bootrd-", dir=out.parent))
    try:
        root = work / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "newroot", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(base_root / "bin/busybox", root / "bin/busybox")
        applets = subprocess.run([str(root / "bin/busybox"), "--list-full"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for a in applets:
            p = root / a
            if a != "bin/busybox" and not p.exists() and a != "linuxrc":
                p.parent.mkdir(parents=True, exist_ok=True)
                p.symlink_to(os.path.relpath(root / "bin/busybox", p.parent))
        src, dst = base_root / "lib/modules/kata-colo", root / "lib/modules/kata-colo"
        dst.mkdir(parents=True)
        order = [m for m in (src / "load.order").read_text().split() if m in BOOT_MODULES]
        missing = set(BOOT_MODULES) - set(order)
        if missing:
            raise SystemExit(f"boot initrd: modules {sorted(missing)} not in load.order")
        for m in order:
            shutil.copy2(src / f"{m}.ko", dst / f"{m}.ko")
        (dst / "load.order").write_text("\n".join(order) + "\n")
        shutil.copy(HERE / "init.sh", root / "init")
        os.chmod(root / "init", 0o755)
        with open(out, "wb") as f:
            c = Cpio(f)
            c.add_dir("dev")
            c.add_chardev("dev/console", 5, 1)
            c.add_chardev("dev/null", 1, 3, 0o666)
            c.add_tree(root)
            c.trailer()
        say(f"boot initrd: {out.stat().st_size >> 10} KiB")
        return out.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
