"""Base userland: prune the unpacked packages, the root skeleton and /init, busybox applet
links, the DT_NEEDED check, and the guest's own Python (run on the host; pyc compilation)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from image_common import HERE, say

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
