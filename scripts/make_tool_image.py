#!/usr/bin/env python3
"""Build an OCI image tarball holding busybox-static plus host binaries and every shared library
they need (resolved with `ldd`, ELF interpreter included); no registry needed.

    python3 scripts/make_tool_image.py OUT.tar [REF] [BINARY...]

Defaults: REF docker.io/library/kata-colo-tools:iperf3, BINARY /usr/bin/iperf3. Same layout and
format as scripts/make_oci_image.py (whose layer and image writer this reuses): one layer, the busybox
tree plus each binary and library at its host path (symlinked sonames stored as regular files).
Deterministic: same host files → same digest.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_oci_image  # noqa: E402

DEFAULT_REF = "docker.io/library/kata-colo-tools:iperf3"
DEFAULT_BINARIES = ("/usr/bin/iperf3",)

# "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_libraries(binary: str) -> list[str]:
    """Absolute paths of every shared library (and the ELF interpreter) ``binary`` loads, as
    the dynamic loader names them; [] for a static binary. Raises if one is not found."""
    res = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if res.returncode != 0:
        if "not a dynamic executable" in res.stdout + res.stderr:
            return []
        raise RuntimeError(f"ldd {binary}: {res.stderr.strip() or res.stdout.strip()}")
    if "not found" in res.stdout:
        raise RuntimeError(f"ldd {binary}: missing libraries:\n{res.stdout}")
    libs: list[str] = []
    for line in res.stdout.splitlines():
        m = _LDD_LINE.match(line)
        if m and m.group(1) not in libs:
            libs.append(m.group(1))
    return libs


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def tool_layer(binaries: list[str], busybox: str = make_oci_image.BUSYBOX) -> bytes:
    """The busybox layer of make_oci_image with ``binaries`` and their libraries appended."""
    files: dict[str, str] = {}                      # path in the image → host path
    for b in binaries:
        files[os.path.abspath(b)] = b
        for lib in shared_libraries(b):
            files.setdefault(lib, lib)
    raw = io.BytesIO(make_oci_image._layer(busybox))
    with tarfile.open(fileobj=raw, mode="r") as tar:
        present = set(tar.getnames())
    raw.seek(0)
    with tarfile.open(fileobj=raw, mode="a", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            for d in _parents(path):
                if d not in present:
                    tar.addfile(make_oci_image._tarinfo(d, type=tarfile.DIRTYPE, mode=0o755))
                    present.add(d)
            name = path.lstrip("/")
            if name in present:
                raise RuntimeError(f"{path} would shadow a busybox entry")
            data = Path(files[path]).read_bytes()   # follows symlinks: soname → real file
            tar.addfile(make_oci_image._tarinfo(name, size=len(data), mode=0o755), io.BytesIO(data))
            present.add(name)
    return raw.getvalue()


def build(out: str, ref: str = DEFAULT_REF, binaries: list[str] | None = None,
          busybox: str = make_oci_image.BUSYBOX) -> str:
    """Write the image tarball; return the manifest digest."""
    layer = tool_layer(list(binaries or DEFAULT_BINARIES), busybox)
    return make_oci_image.write_image(out, ref, layer, {"Cmd": ["sh"]})


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(build(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else DEFAULT_REF, sys.argv[3:] or None))
