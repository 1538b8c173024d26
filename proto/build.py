"""Generate Python modules from the .proto sources under proto/ (run by the package build).

Import paths are rooted at the repository, so `proto/containerd/task/v2/shim.proto` becomes
`proto.containerd.task.v2.shim_pb2`. Well-known types come from grpc_tools' bundled includes.
gRPC service stubs (`*_pb2_grpc.py`) are generated only for the sources under GRPC_DIRS (the
CRI API, spoken over real gRPC); every other service here is served over ttrpc by our own code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

GRPC_DIRS = ("proto/cri", "proto/deviceplugin")


def proto_sources(root: Path) -> list[Path]:
    return sorted((root / "proto").rglob("*.proto"))


def grpc_sources(root: Path) -> list[Path]:
    return sorted(p for d in GRPC_DIRS for p in (root / d).rglob("*.proto"))


def generate(root: str | os.PathLike[str] | None = None) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    base = Path(root) if root else Path(__file__).resolve().parent.parent
    sources = proto_sources(base)
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{base}", f"-I{include}", f"--python_out={base}", f"--pyi_out={base}"]
    args += [str(p.relative_to(base)) for p in sources]
    services = [str(p.relative_to(base)) for p in grpc_sources(base)]
    grpc_args = ["protoc", f"-I{base}", f"-I{include}", f"--grpc_python_out={base}", *services]
    cwd = os.getcwd()
    os.chdir(base)
    try:
        rc = protoc.main(args)
        if rc == 0 and services:
            rc = protoc.main(grpc_args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {len(sources)} files")
    for d in {p.parent for p in sources}:
        for pkg in [d, *d.relative_to(base).parents]:
            init = base / pkg / "__init__.py"
            if pkg != Path(".") and not init.exists():
                init.touch()
    return sources


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else None)
