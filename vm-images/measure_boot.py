#!/usr/bin/env python3
"""Boot the current guest image N times under QEMU TCG and report timings.

Usage: python3 vm-images/measure_boot.py [-n 3] [--image DIR] [--initrd FILE] [-- extra cmdline]
Prints per boot: wall time qemu start -> exit, and guest uptime at "init done" (and after the
python import when kata_colo.selftest=1 is in the extra cmdline).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def boot(image: Path, initrd: Path, extra: str) -> tuple[float, dict[str, float], str]:
    tmp = Path(tempfile.mkdtemp(prefix="kc-measure-"))
    try:
        cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
               "-smp", "2", "-m", "512M", "-kernel", str(image / "vmlinux"), "-initrd", str(initrd),
               "-append", f"console=ttyS0 panic=-1 quiet rdinit=/init kata_colo.init=poweroff {extra}",
               "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
               "-device", "virtio-serial-pci",
               "-chardev", f"socket,id=ag,path={tmp}/ag.sock,server=on,wait=off",
               "-device", "virtserialport,chardev=ag,name=agent.channel.0"]
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300,
                             stdin=subprocess.DEVNULL).stdout
        wall = time.monotonic() - t0
        marks = {}
        m = re.search(r"init done uptime=([\d.]+)", out)
        if m:
            marks["init_done"] = float(m.group(1))
        m = re.search(r"python import took ([\d.]+) -> ([\d.]+)", out)
        if m:
            marks["python_import"] = float(m.group(2)) - float(m.group(1))
        return wall, marks, out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    images = os.environ.get("KATA_COLO_IMAGE_DIR", "/var/lib/kata-colo/images")
    ap.add_argument("--image", default=os.path.join(images, "current"))
    ap.add_argument("--initrd")
    ap.add_argument("--show", action="store_true")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    image = Path(a.image).resolve()
    if not any(x.startswith("kata_colo.selftest=") for x in a.extra):
        a.extra.append("kata_colo.selftest=0")   # bare boot: init steps only, no python
    initrd = Path(a.initrd) if a.initrd else image / "initramfs.cpio"
    for i in range(a.n):
        wall, marks, out = boot(image, initrd, " ".join(a.extra))
        print(f"boot {i}: wall {wall:.2f}s " + " ".join(f"{k}={v:.2f}" for k, v in marks.items()), flush=True)
        if a.show:
            print(out)


if __name__ == "__main__":
    main()
