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
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE_DIR = Path(os.environ.get("KATA_COLO_IMAGE_DIR", "/var/lib/kata-colo/images"))
DEB_CACHE = Path(os.environ.get("KATA_COLO_DEB_CACHE", "/var/cache/kata-colo/debs"))
BUILDER_FILES = [HERE / "build.py", HERE / "init.sh"]
FORMAT_VERSION = 1
KEEP_IMAGES = 3

KERNEL_META = "linux-image-amd64"
# Guest userland packages (Debian bookworm). Shared libs: only what the kept binaries and
# python extension modules link against (checked by check_needed() at build time).
USER_PACKAGES = [
    "busybox-static",
    "libc6", "zlib1g", "libexpat1", "libffi8", "libbz2-1.0", "liblzma5",
    "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal",
    "libstdc++6", "libgcc-s1",          # google._upb._message (protobuf C extension)
    "runc", "libseccomp2",
]
# insmod order from FINDINGS; dependencies are closed over from each module's modinfo.
MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_console", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p",
    "failover", "net_failover", "virtio_net", "virtio_balloon", "virtio_blk",
]
OPTIONAL_MODULES = ["virtio_mem", "vsock", "vmw_vsock_virtio_transport_common",
                    "vmw_vsock_virtio_transport", "virtio_rng"]

# Runc cannot pivot_root out of an initramfs root; the agent must pass --no-pivot.
RUNC_NO_PIVOT = True

# What to keep from the unpacked packages (paths relative to the root, prefix match).
DROP_PREFIXES = [
    "usr/share", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/audit",
    "usr/libexec", "etc/ld.so.conf.d", "usr/lib/python3.11/test",
    "usr/bin/pydoc", "usr/lib/binfmt.d", "usr/lib/valgrind", "usr/lib/gcc",
    "lib/x86_64-linux-gnu/libc_malloc_debug", "lib/x86_64-linux-gnu/libmemusage",
    "lib/x86_64-linux-gnu/libpcprofile", "lib/x86_64-linux-gnu/libSegFault",
    "sbin/ldconfig", "usr/bin/ldd", "usr/bin/iconv", "lib/x86_64-linux-gnu/libmvec",
    "lib/x86_64-linux-gnu/libnsl", "lib/x86_64-linux-gnu/libnss_", "lib/x86_64-linux-gnu/libBrokenLocale",
    "lib/x86_64-linux-gnu/libthread_db", "lib/x86_64-linux-gnu/libanl", "lib/x86_64-linux-gnu/libcidn",
]
PY_DROP_DIRS = {
    "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "venv", "sqlite3", "dbm", "curses", "unittest", "__pycache__",
    "config-3.11-x86_64-linux-gnu", "site-packages", "dist-packages",
}
# extension modules whose libraries we do not ship (or that only serve tests)
PY_DROP_EXT = re.compile(
    r"^(_test\w*|_ctypes_test|xxlimited\w*|_xx\w*|_sqlite3|_dbm|_gdbm|_curses\w*|readline|nis|"
    r"ossaudiodev|audioop|_crypt|_ssl|_hashlib|_uuid|_decimal|_tkinter)\.cpython-311")

STEP_T0 = time.monotonic()
QUIET = False


def say(msg: str) -> None:
    if not QUIET:
        print(f"[image {time.monotonic() - STEP_T0:6.1f}s] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


# ---------------------------------------------------------------- package resolution

def apt_env() -> dict[str, str]:
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")


def apt_candidate(pkg: str) -> str | None:
    out = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True,
                         env=apt_env()).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m and m.group(1) != "(none)" else None


def ensure_apt_lists() -> None:
    if apt_candidate(KERNEL_META) is None:
        say("apt lists missing: apt-get update")
        run(["apt-get", "update", "-qq"], env=apt_env())


def kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True,
                         text=True, check=True, env=apt_env()).stdout
    m = re.search(r"Depends:\s*(linux-image-6\.\d+\.\d+-\d+-amd64)\b", out)
    if not m:
        raise SystemExit(f"cannot resolve {KERNEL_META}: {out!r}")
    return m.group(1)


def apt_state() -> str:
    """Signature of everything that decides apt's candidates (lists, sources, pins, dpkg status)."""
    h = hashlib.sha256(f"{KERNEL_META} {USER_PACKAGES}".encode())
    for d in ["/var/lib/apt/lists", "/etc/apt/sources.list.d", "/etc/apt/preferences.d"]:
        for f in sorted(Path(d).glob("*")) if os.path.isdir(d) else []:
            if f.is_file() and f.name != "lock":
                st = f.stat()
                h.update(f"{f} {st.st_mtime_ns} {st.st_size}\n".encode())
    for f in ["/etc/apt/sources.list", "/etc/apt/preferences", "/var/lib/dpkg/status"]:
        if os.path.exists(f):
            st = os.stat(f)
            h.update(f"{f} {st.st_mtime_ns} {st.st_size}\n".encode())
    return h.hexdigest()


def resolve_packages() -> dict[str, str]:
    """Package -> candidate version; cached against apt_state() (apt-cache costs ~3 s)."""
    cache = IMAGE_DIR / ".resolved.json"
    state = apt_state()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("apt_state") == state:
            return cached["packages"]
    except (OSError, ValueError, KeyError):
        pass
    pkgs = resolve_packages_apt()
    if apt_state() == state:  # unless `apt-get update` ran meanwhile
        cache.write_text(json.dumps({"apt_state": state, "packages": pkgs}) + "\n")
    return pkgs


def resolve_packages_apt() -> dict[str, str]:
    ensure_apt_lists()
    names = [kernel_package(), *USER_PACKAGES]
    out = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True,
                         check=True, env=apt_env()).stdout
    found = dict(re.findall(r"^(\S+?)(?::amd64)?:\n\s+Installed:.*\n\s+Candidate:\s*(\S+)", out, re.M))
    pkgs = {}
    for p in names:
        v = found.get(p)
        if v is None or v == "(none)":
            raise SystemExit(f"package {p} has no install candidate")
        pkgs[p] = v
    return pkgs


def deb_path(pkg: str, ver: str) -> Path:
    return DEB_CACHE / f"{pkg}_{ver.replace(':', '%3a')}_amd64.deb"


def download(pkgs: dict[str, str]) -> dict[str, Path]:
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    paths = {p: deb_path(p, v) for p, v in pkgs.items()}
    missing = [f"{p}={pkgs[p]}" for p, path in paths.items() if not path.exists()]
    if missing:
        say(f"apt-get download {len(missing)} packages into {DEB_CACHE}")
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *missing],
            cwd=DEB_CACHE, env=apt_env(), stdout=subprocess.DEVNULL)
    for p, path in paths.items():
        if not path.exists():
            raise SystemExit(f"download of {p} did not produce {path}")
    return paths


# ---------------------------------------------------------------- kernel

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
        builtin = {Path(l.strip()).name.split(".ko")[0].replace("-", "_")
                   for l in bfile.read_text().splitlines() if l.strip()}
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


# ---------------------------------------------------------------- userland

def unpack(deb: Path, dest: Path) -> None:
    run(["dpkg-deb", "-x", str(deb), str(dest)])


def prune(root: Path) -> None:
    for rel in DROP_PREFIXES:
        p = root / rel
        for q in (p.parent.glob(p.name + "*") if p.parent.exists() else []):
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q)
            else:
                q.unlink()
    pylib = root / "usr/lib/python3.11"
    for d in sorted(pylib.rglob("*"), reverse=True):
        if d.is_dir() and d.name in PY_DROP_DIRS and d.exists():
            shutil.rmtree(d)
    for f in (pylib / "lib-dynload").glob("*.so"):
        if PY_DROP_EXT.match(f.name):
            f.unlink()
    for f in root.rglob("*"):
        if f.is_file() and f.suffix in {".a", ".pyc", ".exe"}:
            f.unlink()
    # sbin/usr/share leftovers from libc6 etc.
    for d in ["usr/lib/x86_64-linux-gnu/perl", "usr/lib/python3/dist-packages"]:
        shutil.rmtree(root / d, ignore_errors=True)


def is_elf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def check_needed(root: Path) -> list[str]:
    """Every DT_NEEDED of every ELF in root must resolve inside root (multiarch dirs)."""
    if not shutil.which("readelf"):
        say("  readelf (binutils) not installed: shared-library check skipped")
        return []
    have = set()
    for d in ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib"]:
        if (root / d).is_dir():
            have.update(x.name for x in (root / d).iterdir())
    problems = []
    for p in root.rglob("*"):
        if p.is_symlink() or not p.is_file() or not is_elf(p) or p.suffix == ".ko":
            continue
        out = subprocess.run(["readelf", "-d", str(p)], capture_output=True, text=True).stdout
        for lib in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out):
            if lib not in have:
                problems.append(f"{p.relative_to(root)} needs {lib}")
    return problems


def guest_python(root: Path) -> list[str]:
    """Run the guest's Python on the host through the guest's own dynamic loader."""
    libpath = ":".join(str(root / d) for d in ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"])
    return [str(root / "lib64/ld-linux-x86-64.so.2"), "--library-path", libpath,
            str(root / "usr/bin/python3.11")]


def compile_pyc(root: Path, pyroot: Path, target: Path, sourceless: bool = False) -> None:
    """Precompile with unchecked-hash pycs (no mtime checks; the guest never recompiles).

    sourceless: write legacy foo.pyc next to foo.py and delete the .py (stdlib only: saves
    ~10 MB of initramfs, i.e. unpack time on every boot; tracebacks lose source lines).
    """
    env = dict(os.environ, PYTHONHOME=str(root / "usr"), PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    cmd = guest_python(root) + ["-I", "-m", "compileall", "-q", "-j", "0",
                                "--invalidation-mode", "unchecked-hash",
                                "-s", str(pyroot), "-p", "/", *(["-b"] if sourceless else []), str(target)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"compileall failed:\n{r.stdout}\n{r.stderr}")
    if sourceless:
        for py in target.rglob("*.py"):
            if py.with_suffix(".pyc").exists():
                py.unlink()


def busybox_links(root: Path) -> int:
    bb = root / "bin/busybox"
    applets = subprocess.run([str(bb), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    n = 0
    for a in applets:
        p = root / a
        if p.exists() or p.is_symlink() or a == "linuxrc":
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(os.path.relpath(bb, p.parent))
        n += 1
    return n


def skeleton(root: Path, manifest_guest: dict) -> None:
    for d in ["proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc/kata-colo", "var/tmp",
              "opt/kata-colo", "lib/modules", "usr/local/bin", "sbin", "usr/sbin"]:
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    (root / "usr/bin/python3").unlink(missing_ok=True)
    (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "var/run").symlink_to("../run")
    etc = root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (etc / "group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    (etc / "hosts").write_text("127.0.0.1 localhost kata-colo\n::1 localhost ip6-localhost\n")
    (etc / "hostname").write_text("kata-colo\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    (etc / "resolv.conf").touch()
    (etc / "mtab").symlink_to("/proc/self/mounts")
    (etc / "kata-colo/guest.json").write_text(json.dumps(manifest_guest, indent=1) + "\n")
    shutil.copy(HERE / "init.sh", root / "init")
    os.chmod(root / "init", 0o755)


# ---------------------------------------------------------------- cpio (newc)

class Cpio:
    """Deterministic newc writer: uid/gid 0, fixed mtime, sorted paths."""

    def __init__(self, f):
        self.f = f
        self.ino = 1000
        self.size = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink=1) -> None:
        self.ino += 1
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{x:08X}" for x in (
            self.ino, mode, 0, 0, nlink, 1, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        buf = hdr.encode() + nb
        buf += b"\0" * (-len(buf) % 4)
        buf += data + b"\0" * (-len(data) % 4)
        self.f.write(buf)
        self.size += len(buf)

    def add_tree(self, root: Path, prefix: str = "") -> int:
        n = 0
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                paths.append(os.path.normpath(os.path.join(rel, name)))
        for rel in paths:
            p = root / rel
            st = os.lstat(p)
            name = (prefix + rel) if prefix else rel
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                self._entry(name, stat.S_IFLNK | 0o777, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                self._entry(name, stat.S_IFDIR | perm, nlink=2)
            elif stat.S_ISREG(st.st_mode):
                self._entry(name, stat.S_IFREG | perm, p.read_bytes())
            else:
                continue
            n += 1
        return n

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)
        pad = -self.size % 512
        self.f.write(b"\0" * pad)
        self.size += pad


# ---------------------------------------------------------------- helpers

def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


# ---------------------------------------------------------------- base layer

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
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[kpkg])], stdout=subprocess.PIPE)
        run(["tar", "-x", "-C", str(kdir), "--wildcards", f"./boot/vmlinuz-{kver}",
             f"./lib/modules/{kver}/*"], stdin=tar.stdout)
        if tar.wait() != 0:
            raise SystemExit("dpkg-deb --fsys-tarfile failed")
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
        guest = {"runc_no_pivot": RUNC_NO_PIVOT, "runc": "/usr/sbin/runc", "kernel": kver,
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
        r = subprocess.run(guest_python(root) + ["-I", "-c", "import asyncio, json, struct, socket, signal, hashlib, ctypes, lzma, bz2, zlib; print('ok')"],
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


# ---------------------------------------------------------------- agent layer

def protobuf_dir() -> Path:
    r = subprocess.run([sys.executable, "-c", "import google.protobuf,os;print(os.path.dirname(google.protobuf.__file__))"],
                       capture_output=True, text=True, check=True)
    return Path(r.stdout.strip())


def ensure_protos() -> None:
    protos = sorted((REPO / "proto").rglob("*.proto"))
    stale = [p for p in protos if not p.with_name(p.stem + "_pb2.py").exists()
             or p.with_name(p.stem + "_pb2.py").stat().st_mtime < p.stat().st_mtime]
    if stale:
        say(f"proto: {len(stale)} stale/missing *_pb2.py: running proto/build.py")
        run([sys.executable, str(REPO / "proto/build.py")], cwd=REPO)


def agent_sources() -> list[tuple[str, Path]]:
    """(guest path under /opt/kata-colo, host path) of every file of the agent layer."""
    out: list[tuple[str, Path]] = []

    def tree(src: Path, dst: str, exts=(".py",)) -> None:
        if not src.is_dir():
            return
        for p in sorted(src.rglob("*")):
            if "__pycache__" in p.parts or not p.is_file():
                continue
            rel = p.relative_to(src)
            if rel.parts and rel.parts[0] in {"tests", "testdata", "test", *HOST_ONLY}:
                continue
            if p.suffix in exts or any(p.name.endswith(e) for e in exts):
                out.append((f"{dst}/{rel}", p))

    for pkg in ["ttrpc", "proto", "agent_api"]:
        tree(REPO / pkg, pkg)
    for f in ["__init__.py", "errors.py"]:
        if (REPO / "shim" / f).exists():
            out.append((f"shim/{f}", REPO / "shim" / f))
    pb = protobuf_dir()
    tree(pb, "google/protobuf", (".py", ".so"))
    upb = pb.parent / "_upb"
    tree(upb, "google/_upb", (".py", ".so"))
    return out


HOST_ONLY = {"cri"}  # proto/cri: the host's CRI client (grpc stubs); the guest never uses it


def agent_key(bkey: str, files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256(f"base={bkey}\n".encode())
    for dst, src in files:
        h.update(dst.encode() + b"\0" + hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()[:12]


def check_agent_imports(rootfs: Path, opt: Path, files: list[tuple[str, Path]]) -> list[str]:
    """Import every agent-layer module with the guest's Python (run on the host through the
    guest's loader): catches stdlib pieces pruned from the base and C-extension ABI problems.

    google.protobuf must import (fatal); other failures are returned as warnings because the
    agent code changes independently of the image.
    """
    mods = sorted({d[:-3].replace("/", ".").removesuffix(".__init__") for d, _ in files
                   if d.endswith(".py") and not d.startswith("google/")
                   and Path(d).stem not in {"__main__", "build", "conftest"}})
    code = ("import importlib, sys\n"
            "import google.protobuf\n"
            "from google.protobuf.internal import api_implementation\n"
            "print('protobuf', google.protobuf.__version__, api_implementation.Type())\n"
            "for m in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except BaseException as e:\n"
            "        print(f'FAIL {m}: {type(e).__name__}: {e}')\n")
    env = dict(os.environ, PYTHONHOME=str(rootfs / "usr"), PYTHONPATH=str(opt),
               PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(guest_python(rootfs) + ["-c", code, *mods], env=env, capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0 or not r.stdout.startswith("protobuf "):
        raise SystemExit(f"guest python cannot import google.protobuf:\n{r.stdout}{r.stderr}")
    say(f"agent layer: guest python imports {r.stdout.splitlines()[0]}, {len(mods)} modules checked")
    return [l[5:] for l in r.stdout.splitlines() if l.startswith("FAIL ")]


def build_agent(base_dir: Path, files: list[tuple[str, Path]], out: Path) -> tuple[int, list[str]]:
    work = Path(tempfile.mkdtemp(prefix=".agent-", dir=out.parent))
    try:
        opt = work / "opt/kata-colo"
        for dst, src in files:
            t = opt / dst
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, t)
            os.chmod(t, 0o755 if src.suffix == ".so" else 0o644)
        for d in opt.rglob("*"):
            if d.is_dir():
                os.chmod(d, 0o755)
        compile_pyc(base_dir / "rootfs", work, opt)
        problems = check_agent_imports(base_dir / "rootfs", opt, files)
        for pr in problems:
            say(f"  WARNING agent module does not import in the guest: {pr}")
        with open(out, "wb") as f:
            c = Cpio(f)
            n = c.add_tree(work)
            c.trailer()
        return n, problems
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- main

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
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild the base layer too")
    ap.add_argument("--compress", choices=["none", "gzip"], default="none",
                    help="initramfs compression (default none: fastest boot under TCG)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--print-dir", action="store_true", help="print the image directory at the end")
    args = ap.parse_args(argv)
    QUIET = args.quiet
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
                n, import_errors = build_agent(base_dir, files, stage / "agent.cpio")
                say(f"agent layer: {n} entries, {(stage / 'agent.cpio').stat().st_size >> 10} KiB")
                os.link(base_dir / "vmlinux", stage / "vmlinux")
                with open(stage / "initramfs.cpio", "wb") as out:
                    for part in (base_dir / "base.cpio", stage / "agent.cpio"):
                        with open(part, "rb") as f:
                            if args.compress == "gzip":
                                out.write(gzip.compress(f.read(), compresslevel=6, mtime=0))
                            else:
                                shutil.copyfileobj(f, out, 1 << 20)
                artifacts = {}
                for a in ["vmlinux", "initramfs.cpio", "agent.cpio"]:
                    artifacts[a] = {"sha256": sha256_file(stage / a), "size": (stage / a).stat().st_size}
                manifest = {
                    "format": FORMAT_VERSION, "key": name, "base_key": bkey, "agent_key": akey,
                    "kernel": base_meta["kernel"], "vmlinux": "vmlinux", "initrd": "initramfs.cpio",
                    "initrd_compression": args.compress, "boot": "pvh",
                    "kernel_cmdline": "console=ttyS0 panic=-1 quiet rdinit=/init",
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
        say(f"ready: {final} (current -> {os.readlink(IMAGE_DIR / 'current') if (IMAGE_DIR / 'current').is_symlink() else '-'}) "
            f"in {time.monotonic() - t0:.1f}s")
        if args.print_dir:
            print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
