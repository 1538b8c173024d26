#!/usr/bin/env python3
"""Build a busybox OCI image tarball from the host's busybox-static (no registry needed).

    python3 scripts/make_oci_image.py OUT.tar [REF]

The tarball (oci-layout, index.json, blobs/sha256/…) imports with `ctr image import OUT.tar`
under REF (default docker.io/library/busybox:kata-colo). Deterministic: same busybox → same digest.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

DEFAULT_REF = "docker.io/library/busybox:kata-colo"
BUSYBOX = "/bin/busybox"


def _tarinfo(name: str, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _layer(busybox: str) -> bytes:
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            tar.addfile(_tarinfo(d, type=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755))
        data = open(busybox, "rb").read()
        tar.addfile(_tarinfo("bin/busybox", size=len(data), mode=0o755), io.BytesIO(data))
        for a in sorted(set(applets) - {"busybox"}):
            tar.addfile(_tarinfo(f"bin/{a}", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777))
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            b = text.encode()
            tar.addfile(_tarinfo(name, size=len(b), mode=0o644), io.BytesIO(b))
    return raw.getvalue()


def build(out: str, ref: str = DEFAULT_REF, busybox: str = BUSYBOX) -> str:
    """Write the image tarball; return the manifest digest."""
    layer_tar = _layer(busybox)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    layer_gz = gzip.compress(layer_tar, mtime=0)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    layer_digest = blob(layer_gz)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }, sort_keys=True).encode()
    config_digest = blob(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": len(layer_gz)}],
    }, sort_keys=True).encode()
    manifest_digest = blob(manifest)
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": len(manifest),
                       "annotations": {"io.containerd.image.name": ref,
                                       "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]}}],
    }, sort_keys=True).encode()
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
        files.update({f"blobs/sha256/{d.split(':', 1)[1]}": b for d, b in blobs.items()})
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_tarinfo(d, type=tarfile.DIRTYPE, mode=0o755))
        for name, data in files.items():
            tar.addfile(_tarinfo(name, size=len(data), mode=0o644), io.BytesIO(data))
    os.replace(tmp, out)
    return manifest_digest


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(build(sys.argv[1], *(sys.argv[2:3] or [])))
