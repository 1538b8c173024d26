#!/usr/bin/env python3
"""Build a busybox OCI image tarball from the host's busybox-static (no registry needed).

    python3 scripts/make_oci_image.py OUT.tar [REF]
    python3 scripts/make_oci_image.py --pause OUT.tar [REF]

The tarball (oci-layout, index.json, blobs/sha256/…) imports with `ctr image import OUT.tar`
under REF (default docker.io/library/busybox:kata-colo). Deterministic: same busybox → same digest.

``--pause`` builds the CRI sandbox ("pause") image instead (default REF
localhost/kata-colo/pause:3.6, imported into containerd's ``k8s.io`` namespace and named by the
CRI plugin's ``sandbox_image``): busybox's ``sh`` and ``sleep`` and an entrypoint ``/pause`` that,
as the pod's pid 1, exits 0 on SIGTERM/SIGINT, reaps orphans and otherwise sleeps forever.
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
PAUSE_REF = "localhost/kata-colo/pause:3.6"
BUSYBOX = "/bin/busybox"
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# pid 1 of the pod: a signal without a handler is ignored for pid 1, so trap TERM/INT and exit
# 0; ash's `wait` reaps every child (orphans re-parented to us included) and returns early when
# a trapped signal arrives.
PAUSE_SCRIPT = """#!/bin/sh
# kata-colo pause: the pod sandbox's pid 1.
trap 'exit 0' TERM INT
while :; do
  sleep 86400 &
  wait $!
done
"""


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


def _pause_layer(busybox: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "dev", "etc", "proc", "sys"):
            tar.addfile(_tarinfo(d, type=tarfile.DIRTYPE, mode=0o755))
        data = open(busybox, "rb").read()
        tar.addfile(_tarinfo("bin/busybox", size=len(data), mode=0o755), io.BytesIO(data))
        for a in ("sh", "sleep"):
            tar.addfile(_tarinfo(f"bin/{a}", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777))
        script = PAUSE_SCRIPT.encode()
        tar.addfile(_tarinfo("pause", size=len(script), mode=0o755), io.BytesIO(script))
    return raw.getvalue()


def build(out: str, ref: str = DEFAULT_REF, busybox: str = BUSYBOX) -> str:
    """Write the busybox image tarball; return the manifest digest."""
    return write_image(out, ref, _layer(busybox), {"Cmd": ["sh"]})


def build_pause(out: str, ref: str = PAUSE_REF, busybox: str = BUSYBOX) -> str:
    """Write the pause image tarball; return the manifest digest."""
    return write_image(out, ref, _pause_layer(busybox), {"Entrypoint": ["/pause"]})


def write_image(out: str, ref: str, layer_tar: bytes, config_extra: dict[str, object]) -> str:
    """Write a one-layer OCI image tarball (``config_extra`` merged into the image config's
    ``config``); return the manifest digest."""
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
        "config": {"Env": [ENV_PATH], "WorkingDir": "/", **config_extra},
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
    argv = sys.argv[1:]
    pause = argv[:1] == ["--pause"]
    argv = argv[1:] if pause else argv
    if not argv:
        sys.exit(__doc__)
    print((build_pause if pause else build)(argv[0], *(argv[1:2] or [])))
