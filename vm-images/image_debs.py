"""Debian packages of the guest: resolve candidate versions (cached), download, unpack."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

from image_common import IMAGE_DIR, run, say

DEB_CACHE = Path(os.environ.get("KATA_COLO_DEB_CACHE", "/var/cache/kata-colo/debs"))

KERNEL_META = "linux-image-amd64"
# Guest userland packages (Debian bookworm). Shared libs: only what the kept binaries and
# python extension modules link against (checked by check_needed() at build time).
USER_PACKAGES = [
    "busybox-static",
    "libc6", "zlib1g", "libexpat1", "libffi8", "libbz2-1.0", "liblzma5",
    "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal",
    "libstdc++6", "libgcc-s1",          # google._upb._message (protobuf C extension)
    "runc", "libseccomp2",
    # crun, the other guest OCI runtime ([agent.kata] oci_runtime = "crun"), and its libraries
    "crun", "libyajl2", "libcap2", "libsystemd0", "libgcrypt20", "libzstd1", "liblz4-1", "libgpg-error0",
]


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


def unpack(deb: Path, dest: Path) -> None:
    run(["dpkg-deb", "-x", str(deb), str(dest)])
