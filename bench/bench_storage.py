"""Container file I/O: write and read throughput of a file in the container's rootfs on the 9p
share vs on the block rootfs (erofs layers + ext4 scratch disk, overlay in the guest) vs the host
disk (the same dd on the host, same directory tree), and on an emulated NVMe data disk (a kata
direct volume: an ext4 image file on the host disk). Goal: block rootfs ≥ 3× 9p for writes.

Each VM mode is one ``ctr run`` (QEMU/TCG) running ``dd`` twice: write ``KC_BENCH_MIB`` MiB with
``conv=fsync`` (to the disk, not the page cache), then read it back with ``iflag=direct`` (when the
filesystem refuses O_DIRECT the read is a cached read and says so); then ``KC_BENCH_SMALL_FILES``
files of 4 KiB copied from the guest's tmpfs (``cp -r``) + ``sync``, the metadata-heavy writes of installs and builds.
Under TCG a large sequential write is bound by the guest's page-cache copy (9p's zero-copy
writes skip it), so the large-file ratio says little about KVM hosts; the small-file ratio is the
round-trip cost each 9p operation pays. Also printed: the layer
cache's build time for the image vs a cache hit (the time a second container saves).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = int(os.environ.get("KC_BENCH_MIB", "64"))
SMALL_FILES = int(os.environ.get("KC_BENCH_SMALL_FILES", "1024"))
IMAGES = Path(os.environ.get("KATA_COLO_IMAGE_DIR", "/var/lib/kata-colo/images")) / "current"
RUNTIME = "io.containerd.kata-colo.v2"
IMAGE = "docker.io/library/busybox:kata-colo"


def _script(path: str) -> str:
    """Write then read ``path``/kc-bench.dat; prints ``ELAPSED write|read <seconds> [direct|cached]``
    (busybox dd prints no timing, so /proc/uptime brackets each dd)."""
    f = f"{path}/kc-bench.dat"
    t = "cut -d' ' -f1 /proc/uptime"
    return (f"t0=$({t}); dd if=/dev/zero of={f} bs=1M count={MIB} conv=fsync 2>/dev/null; t1=$({t}); "
            f"echo ELAPSED write $(echo $t0 $t1 | awk '{{print $2-$1}}'); "
            f"t0=$({t}); if dd if={f} of=/dev/null bs=1M iflag=direct 2>/dev/null; then m=direct; "
            f"else dd if={f} of=/dev/null bs=1M 2>/dev/null; m=cached; fi; t1=$({t}); "
            f"echo ELAPSED read $(echo $t0 $t1 | awk '{{print $2-$1}}') $m; rm -f {f}; "
            f"mkdir -p /dev/shm/kc-src && head -c 4096 /dev/urandom > /dev/shm/kc-src/0 && "
            f"for i in $(seq {SMALL_FILES - 1}); do ln /dev/shm/kc-src/0 /dev/shm/kc-src/$i; done; "
            f"t0=$({t}); cp -r /dev/shm/kc-src {path}/kc-small && sync; t1=$({t}); "
            f"n=$(ls {path}/kc-small | wc -l); echo ELAPSED small $(echo $t0 $t1 | awk '{{print $2-$1}}') $n; "
            f"rm -rf {path}/kc-small /dev/shm/kc-src")


_ELAPSED = re.compile(r"^ELAPSED (write|read|small) ([0-9.e+-]+)(?: (\w+))?$", re.M)  # small: + file count


def _rates(out: str) -> tuple[float, float, str, float]:
    """(write MiB/s, read MiB/s, read kind, small files written per second)."""
    found = {m.group(1): (float(m.group(2)), m.group(3) or "") for m in _ELAPSED.finditer(out)}
    if set(found) != {"write", "read", "small"}:
        raise RuntimeError(f"unexpected output:\n{out}")
    if found["small"][1] != str(SMALL_FILES):
        raise RuntimeError(f"small-file copy made {found['small'][1]} files, not {SMALL_FILES}:\n{out}")
    w, r, n = (max(found[k][0], 0.01) for k in ("write", "read", "small"))
    return MIB / w, MIB / r, found["read"][1], SMALL_FILES / n


def _config(d: Path, block: bool) -> Path:
    p = d / f"config-{'block' if block else '9p'}.toml"
    p.write_text(f"""
[hypervisor.qemu]
kernel = "{IMAGES / 'vmlinux'}"
initrd = "{IMAGES / 'initramfs.cpio'}"
disable_block_device_use = {str(not block).lower()}
[storage]
layer_cache_dir = "{d / 'layers'}"
scratch_dir = "{d / 'scratch'}"
direct_volumes_dir = "{d / 'dv'}"
claims_dir = "{d / 'claims'}"
""")
    return p


def _cache_saving(d: Path) -> None:
    """A second container of the same image: a cache hit vs building the layer image (a copy of
    a real host tree stands in for a bigger image layer than busybox's)."""
    from shim.resources.blockdev.cache import LayerCache

    src = next((p for p in ("/usr/lib/python3.11", "/usr/share") if os.path.isdir(p)), "")
    if not src:
        return
    layer = d / "big-layer"
    shutil.copytree(src, layer, symlinks=True, ignore_dangling_symlinks=True)
    cache = LayerCache(d / "layers-big", 4 << 30)
    first = cache.acquire(str(layer))
    second = cache.acquire(str(layer))
    first.release()
    second.release()
    print(f"layer cache, {first.size >> 20} MiB layer ({src}): first container {first.seconds:.3f}s (build), "
          f"second {second.seconds * 1000:.1f}ms (hit): {first.seconds / max(second.seconds, 1e-6):.0f}x, "
          f"{first.seconds - second.seconds:.2f}s saved per container per layer")


def main() -> None:
    if os.geteuid() != 0 or shutil.which("containerd") is None or not (IMAGES / "manifest.json").exists():
        print("bench_storage: needs root, containerd and a built guest image; skipped")
        return
    sys.path.insert(0, str(REPO))
    from tests.support.containerd import product_shim_dir, start_containerd, stop_containerd

    d = Path(tempfile.mkdtemp(prefix="kc-bench-storage-", dir="/var/tmp"))
    block_cfg, ninep_cfg = _config(d, True), _config(d, False)
    shim_dir = product_shim_dir()
    os.environ["KATA_COLO_CONFIG"] = str(block_cfg)
    c = start_containerd([shim_dir])
    try:
        c.import_busybox()
        img = d / "data.img"
        subprocess.run(["truncate", "-s", f"{MIB * 3}M", str(img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
        vol = d / "vol"
        vol.mkdir()
        info = d / "dv" / base64.urlsafe_b64encode(str(vol).encode()).decode()
        info.mkdir(parents=True)
        (info / "mountInfo.json").write_text(json.dumps({"device": str(img), "fstype": "ext4"}))

        results: dict[str, tuple[float, float, str, float]] = {}
        host_dir = d / "host"
        host_dir.mkdir()
        results["host disk"] = _rates(subprocess.run(["sh", "-c", _script(str(host_dir))], capture_output=True,
                                                     text=True).stdout)
        runs = [("9p rootfs", ["--runtime-config-path", str(ninep_cfg)], "/"),
                ("block rootfs", [], "/"),
                ("NVMe data disk", ["--mount", f"type=bind,src={vol},dst=/data,options=rbind:rw"], "/data")]
        for i, (label, extra, path) in enumerate(runs):
            t0 = time.monotonic()
            res = c.ctr("run", "--rm", "--runtime", RUNTIME, *extra, IMAGE, f"kc-bench-st{i}", "sh", "-c",
                        _script(path.rstrip("/") or "/tmp/.."), timeout=600)
            results[label] = _rates(res.stdout.decode())
            print(f"  {label}: ran in {time.monotonic() - t0:.1f}s", flush=True)
        print(f"file of {MIB} MiB, dd bs=1M (write: conv=fsync; read: O_DIRECT where the fs allows it)")
        print(f"{'where':<16} {'write MiB/s':>12} {'read MiB/s':>11}  {'read':<7}{'4 KiB files/s':>14}")
        for label, (w, r, kind, n) in results.items():
            print(f"{label:<16} {w:>12.1f} {r:>11.1f}  {kind:<7}{n:>14.0f}")
        w9, wb = results["9p rootfs"][0], results["block rootfs"][0]
        print(f"block rootfs / 9p rootfs: large-file write {wb / w9:.2f}x, small-file write "
              f"{results['block rootfs'][3] / results['9p rootfs'][3]:.2f}x (goal >= 3x), "
              f"read {results['block rootfs'][1] / results['9p rootfs'][1]:.2f}x")
        print(f"block rootfs / host disk write: {wb / results['host disk'][0]:.2f}x; "
              f"NVMe data disk / host disk write: {results['NVMe data disk'][0] / results['host disk'][0]:.2f}x")
        for m in (json.loads(p.read_text()) for p in (d / "layers").glob("*.json")):
            print(f"layer cache: image of {m['source']} ({m['size'] >> 10} KiB) built in {m['build_seconds']:.3f}s, "
                  f"{m['hits']} hit(s) since")
        _cache_saving(d)
    finally:
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
