"""Agent layer: agent.cpio with /opt/kata-colo (common, ttrpc, proto, agent_api without its host
client, and the host's google.protobuf), its content key, and the import check with the guest's
Python. No host code (shim/, hypervisor/, agent_api/client/) is shipped."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from image_common import REPO, run, say
from image_cpio import Cpio
from image_userland import compile_pyc, guest_python


def protobuf_dir() -> Path:
    code = "import google.protobuf,os;print(os.path.dirname(google.protobuf.__file__))"
    r = subprocess.run([sys.executable, "-c", code],
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
            if rel.parts and rel.parts[0] in {"tests", "testdata", "test"}:
                continue
            if f"{dst}/{rel}".startswith(HOST_ONLY):
                continue
            if p.suffix in exts or any(p.name.endswith(e) for e in exts):
                out.append((f"{dst}/{rel}", p))

    for pkg in GUEST_PACKAGES:
        tree(REPO / pkg, pkg)
    pb = protobuf_dir()
    tree(pb, "google/protobuf", (".py", ".so"))
    upb = pb.parent / "_upb"
    tree(upb, "google/_upb", (".py", ".so"))
    return out


#: What the guest runs: the neutral package, ttrpc, the protobufs and the agent API.
GUEST_PACKAGES = ("common", "ttrpc", "proto", "agent_api")
#: Host-only parts of those packages: the CRI stubs and the agent client.
HOST_ONLY = ("proto/cri/", "agent_api/client/")


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
    return [ln[5:] for ln in r.stdout.splitlines() if ln.startswith("FAIL ")]


def build_agent(base_dir: Path, files: list[tuple[str, Path]], out: Path,
                keep_tree: Path | None = None) -> tuple[int, list[str]]:
    """agent.cpio (and, with ``keep_tree``, the same tree as a directory: the root image)."""
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
        if keep_tree is not None:
            shutil.copytree(work, keep_tree, symlinks=True)
        return n, problems
    finally:
        shutil.rmtree(work, ignore_errors=True)
