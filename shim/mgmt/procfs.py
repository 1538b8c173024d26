"""Per-process families read from /proc/<pid>, named the way kata's Go runtime names them.

``process_families("kata_shim", "self")`` gives kata_shim_{threads,proc_status,proc_stat,
io_stat,fds,netdev}; with the VMM's pid and ``kata_hypervisor`` the hypervisor's. Items and
units follow kata's ``pkg/utils`` helpers over prometheus/procfs: proc_status items are
lower-case (``vmrss``...) in bytes, io_stat items ``rchar, wchar, syscr, syscw, readbytes,
writebytes, cancelledwritebytes``, proc_stat ``utime, stime, cutime, cstime`` in clock ticks,
netdev ``recv_*``/``sent_*`` per interface of the process's network namespace. A process that is
gone yields no families (never an error: a scrape must not fail on a dying VMM).
"""
from __future__ import annotations

import os

from common.procparse import NETDEV_ITEMS
from common.procparse import netdev as parse_netdev
from common.procparse import stat_fields as parse_stat_fields
from common.prom_text import Family, gauge, labelled

STATUS_ITEMS = {"VmPeak": "vmpeak", "VmSize": "vmsize", "VmLck": "vmlck", "VmPin": "vmpin",
                "VmHWM": "vmhwm", "VmRSS": "vmrss", "RssAnon": "rssanon", "RssFile": "rssfile",
                "RssShmem": "rssshmem", "VmData": "vmdata", "VmStk": "vmstk", "VmExe": "vmexe",
                "VmLib": "vmlib", "VmPTE": "vmpte", "VmPMD": "vmpmd", "VmSwap": "vmswap",
                "HugetlbPages": "hugetlbpages"}
CTXT_ITEMS = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
IO_ITEMS = {"rchar": "rchar", "wchar": "wchar", "syscr": "syscr", "syscw": "syscw",
            "read_bytes": "readbytes", "write_bytes": "writebytes",
            "cancelled_write_bytes": "cancelledwritebytes"}
WHO = {"kata_shim": "Kata containerd shim v2 process", "kata_hypervisor": "Hypervisor process"}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def status_items(text: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        if key in STATUS_ITEMS:
            scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            out.append((STATUS_ITEMS[key], float(int(parts[0]) * scale)))
        elif key in CTXT_ITEMS:
            out.append((key, float(parts[0])))
    return out


def io_items(text: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in IO_ITEMS and value.strip().isdigit():
            out.append((IO_ITEMS[key], float(value)))
    return out


def count_fds(pid: str) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def process_families(ns: str, pid: int | str, proc: str = "/proc") -> list[Family]:
    """kata's per-process families under namespace ``ns`` (kata_shim, kata_hypervisor)."""
    who = WHO.get(ns, "Process")
    base = f"{proc}/{pid}"
    stat = _read(f"{base}/stat")
    if stat is None:
        return []
    fams: list[Family] = []
    fields = parse_stat_fields(stat)
    if len(fields) > 17:
        fams.append(gauge(f"{ns}_threads", f"{who} threads.", float(fields[17])))
        fams.append(labelled(f"{ns}_proc_stat", f"{who} statistics.", "item",
                             [(k, float(fields[i])) for k, i in (("utime", 11), ("stime", 12),
                                                                 ("cutime", 13), ("cstime", 14))]))
    status = _read(f"{base}/status")
    if status:
        fams.append(labelled(f"{ns}_proc_status", f"{who} status.", "item", status_items(status)))
    io = _read(f"{base}/io")
    if io:
        fams.append(labelled(f"{ns}_io_stat", f"{who} IO statistics.", "item", io_items(io)))
    fds = count_fds(str(pid)) if proc == "/proc" else None
    if fds is not None:
        fams.append(gauge(f"{ns}_fds", f"{who} open FDs.", float(fds)))
    netdev = _read(f"{base}/net/dev")
    if netdev:
        fam = Family(f"{ns}_netdev", f"{who} network devices statistics.", "gauge")
        for name, values in parse_netdev(netdev):
            for item, value in zip(NETDEV_ITEMS, values):
                fam.add(value, (("interface", name), ("item", item)))
        fams.append(fam)
    return fams


def cpu_seconds(pid: int | str, proc: str = "/proc") -> float | None:
    """utime+stime of a process in seconds (None when it is gone)."""
    stat = _read(f"{proc}/{pid}/stat")
    fields = parse_stat_fields(stat) if stat else []
    if len(fields) <= 12:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int, tid: int, proc: str = "/proc") -> float | None:
    return cpu_seconds(f"{pid}/task/{tid}", proc)


def rss_bytes(pid: int | str, proc: str = "/proc") -> int | None:
    status = _read(f"{proc}/{pid}/status")
    for key, value in status_items(status or ""):
        if key == "vmrss":
            return int(value)
    return None
