"""Small shared helpers for the cgroup drivers: file I/O with ResourceError mapping, mount
discovery (/proc/self/mounts), and per-thread /proc lookups."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from common.errors import ResourceError

MOUNTS = "/proc/self/mounts"


def write_value(path: str, value: str | int) -> None:
    """One write() of ``value`` to a cgroup file (no O_CREAT; each write is one kernel op)."""
    data = str(value).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ResourceError(f"cannot open {path}: {exc.strerror}") from None
    try:
        os.write(fd, data)
    except OSError as exc:
        raise ResourceError(f"cannot write {data.decode()!r} to {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def try_write(path: str, value: str | int) -> int:
    """Like :func:`write_value` but returns the errno (0 on success) instead of raising."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        os.write(fd, str(value).encode())
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(fd)


def read_value(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise ResourceError(f"cannot read {path}: {exc.strerror}") from None


def read_ints(path: str) -> list[int]:
    """A newline-separated list of integers (tasks, cgroup.threads, cgroup.procs); [] if gone."""
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.EOPNOTSUPP):
            return []
        raise ResourceError(f"cannot read {path}: {exc.strerror}") from None


def remove_dir(path: str) -> bool:
    """rmdir a cgroup; False if it did not exist. ResourceError when busy."""
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ResourceError(f"cannot remove cgroup {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class Mount:
    path: str
    fstype: str
    options: frozenset[str]


def cgroup_mounts(mounts_file: str = MOUNTS) -> list[Mount]:
    out: list[Mount] = []
    with open(mounts_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                path = fields[1].replace("\\040", " ")
                out.append(Mount(path, fields[2], frozenset(fields[3].split(","))))
    return out


def v1_mountpoints(mounts: list[Mount]) -> dict[str, str]:
    """controller → mountpoint for the v1 controllers we use (cpu, cpuacct, cpuset)."""
    found: dict[str, str] = {}
    for m in mounts:
        if m.fstype != "cgroup":
            continue
        for ctrl in ("cpu", "cpuacct", "cpuset"):
            if ctrl in m.options and ctrl not in found:
                found[ctrl] = m.path
    return found


def v2_mountpoint(mounts: list[Mount]) -> str | None:
    for m in mounts:
        if m.fstype == "cgroup2":
            return m.path
    return None


def thread_tgid(tid: int) -> int | None:
    """The process (thread group) id of a thread, None if it is gone."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def process_threads(pid: int) -> list[int]:
    """All thread ids of a process (/proc/<pid>/task); ResourceError if the process is gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise ResourceError(f"process {pid} does not exist") from None


def thread_cgroups(tid: int) -> dict[str, str]:
    """/proc/<tid>/cgroup → {hierarchy key: path}; key is the controller list ("cpu",
    "cpu,cpuacct", ...) for v1 and "" for the v2 hierarchy."""
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{tid}/cgroup") as f:
            for line in f:
                _hid, ctrls, path = line.rstrip("\n").split(":", 2)
                out[ctrls] = path
    except FileNotFoundError:
        raise ResourceError(f"thread {tid} does not exist") from None
    return out


def online_cpus() -> tuple[int, ...]:
    from shim.resources.qos.model import parse_cpuset

    try:
        return parse_cpuset(read_value("/sys/devices/system/cpu/online"))
    except ResourceError:
        return tuple(sorted(os.sched_getaffinity(0)))
