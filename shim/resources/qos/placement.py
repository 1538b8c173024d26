"""The placement hot path: attach thread ids to cgroups and set their CPU affinity.

An op is ``(tid, attach_files, cpus)``: write ``tid`` to every file in ``attach_files`` (v1
``tasks`` of each hierarchy, v2 ``cgroup.threads``), then ``sched_setaffinity(tid, cpus)`` unless
``cpus`` is None. Each file is opened once and receives one write() per tid (the kernel takes one
id per write); all attachments happen before any affinity call, because attaching to a v1 cpuset
resets the affinity. Failures do not stop the batch: they come back as
``(tid, file or "sched_setaffinity", errno)`` and the caller decides (a vanished non-vCPU thread
is harmless; a vCPU thread that cannot be moved is not).

:func:`place_threads_py` is the reference implementation; ``shim._speedups.pinning`` does the
same in C with the GIL released. :func:`best_placer` returns the fastest one available.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Sequence

PlaceOp = tuple[int, Sequence[str], Sequence[int] | None]
Failure = tuple[int, str, int]
Placer = Callable[[Iterable[PlaceOp]], list[Failure]]
AFFINITY = "sched_setaffinity"


def place_threads_py(ops: Iterable[PlaceOp]) -> list[Failure]:
    by_file: dict[str, list[int]] = {}
    affinity: list[tuple[int, Sequence[int]]] = []
    for tid, files, cpus in ops:
        for path in files:
            by_file.setdefault(path, []).append(tid)
        if cpus is not None:
            affinity.append((tid, cpus))
    failures: list[Failure] = []
    for path, tids in by_file.items():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            failures.extend((tid, path, exc.errno or errno.EIO) for tid in tids)
            continue
        try:
            for tid in tids:
                try:
                    os.write(fd, b"%d" % tid)
                except OSError as exc:
                    failures.append((tid, path, exc.errno or errno.EIO))
        finally:
            os.close(fd)
    for tid, cpus in affinity:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError as exc:
            failures.append((tid, AFFINITY, exc.errno or errno.EIO))
    return failures


def cython_placer() -> Placer | None:
    try:
        from shim._speedups import pinning  # type: ignore[attr-defined]
    except ImportError:
        return None
    return pinning.place_threads


def available_placers() -> dict[str, Placer]:
    placers: dict[str, Placer] = {"python": place_threads_py}
    fast = cython_placer()
    if fast is not None:
        placers["cython"] = fast
    return placers


def best_placer() -> Placer:
    """The C implementation when the extension is built, the pure-Python one otherwise."""
    return cython_placer() or place_threads_py
