"""Guest kernel: the PVH vmlinux out of Debian's bzImage, and the virtio/9p modules plus the
block-storage ones (the block rootfs: erofs/ext4 layers + overlay on virtio-blk or virtio-scsi;
data disks on emulated or passed-through NVMe) — dependency closure from modinfo, decompressed,
signatures stripped, insmod order."""
from __future__ import annotations

import lzma
import struct
import subprocess
from pathlib import Path

from image_common import run, say

# insmod order from FINDINGS; dependencies are closed over from each module's modinfo.
MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_console", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p",
    "failover", "net_failover", "virtio_net", "virtio_balloon", "virtio_blk",
    # block storage: checksums ext4/jbd2 ask the crypto API for (no modprobe in the guest)
    "crc32c_generic", "libcrc32c", "erofs", "ext4", "overlay",
    "nvme", "scsi_mod", "virtio_scsi", "sd_mod",
]
OPTIONAL_MODULES = ["crc32c_intel", "virtio_mem", "vsock", "vmw_vsock_virtio_transport_common",
                    "vmw_vsock_virtio_transport", "virtio_rng"]


def unpack_kernel(deb: Path, kver: str, kdir: Path) -> None:
    """Extract only /boot/vmlinuz-KVER and /lib/modules/KVER/ of the kernel package into kdir."""
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    run(["tar", "-x", "-C", str(kdir), "--wildcards", f"./boot/vmlinuz-{kver}",
         f"./lib/modules/{kver}/*"], stdin=tar.stdout)
    if tar.wait() != 0:
        raise SystemExit("dpkg-deb --fsys-tarfile failed")


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    data = vmlinuz.read_bytes()
    magic = bytes.fromhex("fd377a585a00")
    pos = data.find(magic)
    while pos >= 0:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = dec.decompress(data[pos:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            out.write_bytes(elf)
            return
        pos = data.find(magic, pos + 1)
    raise SystemExit(f"no xz-compressed ELF payload found in {vmlinuz}")


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """Parse the .modinfo section of an ELF64 kernel module."""
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def sh(i):
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = sh(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = sh(i)
        end = ko.index(b"\0", stroff + name)
        if ko[stroff + name:end] == b".modinfo":
            for kv in ko[off:off + size].split(b"\0"):
                if b"=" in kv:
                    k, v = kv.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(ko: bytes) -> bytes:
    """Drop the appended PKCS#7 signature: verifying it costs ~50 ms per module under TCG.

    Unsigned modules load fine (module.sig_enforce is off in Debian's kernel without
    lockdown); the kernel only notes the taint once.
    """
    if not ko.endswith(SIG_MAGIC):
        return ko
    end = len(ko) - len(SIG_MAGIC)
    # struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len (be32)
    sig_len, = struct.unpack_from(">I", ko, end - 4)
    return ko[:end - 12 - sig_len]


def build_modules(modroot: Path, dest: Path) -> list[str]:
    """Decompress the wanted modules + their dependencies into dest; return load order."""
    index = {}
    for p in modroot.rglob("*.ko*"):
        name = p.name.split(".ko")[0].replace("-", "_")
        index[name] = p
    builtin = set()
    bfile = modroot / "modules.builtin"
    if bfile.exists():
        builtin = {Path(ln.strip()).name.split(".ko")[0].replace("-", "_")
                   for ln in bfile.read_text().splitlines() if ln.strip()}
    order: list[str] = []
    seen: set[str] = set()
    blobs: dict[str, bytes] = {}

    def visit(name: str, optional: bool) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            if name in builtin:
                return
            if optional:
                say(f"  module {name} not available, skipped")
                return
            raise SystemExit(f"kernel module {name} not found")
        raw = index[name].read_bytes()
        if index[name].suffix == ".xz":
            raw = lzma.decompress(raw)
        elif index[name].suffix == ".zst":
            raw = subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout
        raw = strip_signature(raw)
        deps = [d for d in ",".join(modinfo(raw).get("depends", [""])).split(",") if d]
        for d in deps:
            visit(d, False)
        blobs[name] = raw
        order.append(name)

    for m in MODULES:
        visit(m, False)
    for m in OPTIONAL_MODULES:
        visit(m, True)
    dest.mkdir(parents=True, exist_ok=True)
    for name, raw in blobs.items():
        (dest / f"{name}.ko").write_bytes(raw)
    (dest / "load.order").write_text("\n".join(order) + "\n")
    return order
