"""The `start` side of the shim contract (docs/protocols.md §1): group id, socket address (runc's
convention), binding/reusing the shared socket, the bundle's ``address`` file."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

SOCKET_ROOT = "/run/containerd/s"
SOCKET_PATH_LIMIT = 106
ANNOTATION_GROUP = "io.containerd.runc.v2.group"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


def go_clean(path: str) -> str:
    """Go's path/filepath.Clean for Unix paths."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    cleaned = "/".join(out)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def go_join(*elems: str) -> str:
    """Go's path/filepath.Join: join the non-empty elements with '/', then Clean."""
    parts = [e for e in elems if e]
    return go_clean("/".join(parts)) if parts else ""


def socket_path(address: str, namespace: str, group_id: str, root: str = SOCKET_ROOT) -> str:
    """runc-v2's shim.SocketAddress without the scheme:
    ``/run/containerd/s/`` + hex(sha256(filepath.Join(address, ns, id)))."""
    digest = hashlib.sha256(go_join(address, namespace, group_id).encode()).hexdigest()
    return f"{root}/{digest}"


def group_id(spec: dict[str, Any] | None, task_id: str) -> str:
    annotations = (spec or {}).get("annotations") or {}
    return (annotations.get(ANNOTATION_GROUP) or annotations.get(ANNOTATION_SANDBOX_ID)
            or task_id)


def read_bundle_spec(bundle: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        spec = json.loads(Path(bundle, "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def is_serving(path: str, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def bind_or_reuse(path: str) -> socket.socket | None:
    """Bind and listen on ``path`` (mode 0600). None when a live server already owns it;
    a stale socket file is removed and rebound."""
    if len(path) > SOCKET_PATH_LIMIT:
        raise ValueError(f"{path!r}: unix socket path too long (> {SOCKET_PATH_LIMIT})")
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if is_serving(path):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        try:
            os.chmod(path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return sock
    raise OSError(errno.EADDRINUSE, f"cannot bind {path}")


def write_address(bundle: str | os.PathLike[str], address: str) -> None:
    """Atomically write ``<bundle>/address`` (the socket URI, no newline)."""
    _write_atomic(bundle, "address", address)


def write_pid(bundle: str | os.PathLike[str], pid: int) -> None:
    """Atomically write ``<bundle>/shim.pid``: the serving daemon's pid (as the runc v2 shim
    does; the daemon is a fork of ``start``, so ``ps`` shows both with the same command line)."""
    _write_atomic(bundle, "shim.pid", str(pid))


def _write_atomic(bundle: str | os.PathLike[str], name: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=bundle)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, Path(bundle, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
