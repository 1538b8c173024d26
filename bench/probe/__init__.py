"""The interference bench's native parts and its helpers.

probe.c (the online CPU-duty probe), loadgen.c (open-loop HTTP load on libcurl), worker.c (the
offline guest workload, linked statically so it runs in any container) are compiled by
:func:`build` with the host's gcc into a directory of the caller's choice; the Python modules
beside them drive the online side (online.py), the offline VMs (offline.py) and the statistics
(stats.py) for bench/bench_interference.py.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {
    "probe": (["probe.c"], ["-pthread"]),
    "loadgen": (["loadgen.c"], ["-lcurl"]),
    "worker": (["worker.c"], ["-static", "-pthread"]),
}


def missing_tools() -> list[str]:
    out = [t for t in ("gcc",) if shutil.which(t) is None]
    if not Path("/usr/include/x86_64-linux-gnu/curl/curl.h").exists() and not Path("/usr/include/curl/curl.h").exists():
        out.append("libcurl4-openssl-dev")
    return out


def build(out_dir: Path) -> dict[str, Path]:
    """Compile every target into ``out_dir``; name → binary path. Raises CalledProcessError
    with gcc's message on failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, (sources, flags) in TARGETS.items():
        binary = out_dir / name
        srcs = [str(HERE / s) for s in sources]
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), *srcs]
        # link flags after the sources (static and -l order matters)
        subprocess.run(cmd + flags, check=True, capture_output=True, text=True)
        paths[name] = binary
    return paths
