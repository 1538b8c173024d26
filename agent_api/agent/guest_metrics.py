"""The agent's GetMetrics: kata's ``kata_agent_*`` and ``kata_guest_*`` families from the guest's
/proc, as Prometheus text (kata-containers src/agent/src/metrics.rs names, labels and units).

Agent process (``kata_agent_``): scrape_count (counter), threads, total_time (s), total_vm and
total_rss (bytes), proc_status{item} (kB, /proc/self/status), io_stat{item}, proc_stat{item}
(clock ticks), and the process_* families kata's shim prefixes with ``kata_agent_``.
Guest OS (``kata_guest_``): load{item=load1|load5|load15}, tasks{item=cur|max},
cpu_time{cpu=N|total,item} (ms), vm_stat{item} (every /proc/vmstat key),
netdev_stat{interface,item}, diskstat{disk,item}, meminfo{item} (bytes, snake_case keys),
filesystem_bytes{mount,device,item} and filesystem_inodes{mount,device,item} (statvfs of the
real filesystems in /proc/mounts). All gauges except the counters named so.

A file that cannot be read leaves its families out; nothing here raises for guest state. Entry
counts are bounded (:data:`MAX_ENTRIES` disks, interfaces, mounts) so the text stays small.
"""
from __future__ import annotations

import os
import re
import resource
import time

from common.procparse import MAX_ENTRIES, NETDEV_ITEMS
from common.procparse import netdev as parse_netdev
from common.procparse import stat_fields as parse_stat_fields
from common.prom_text import Family, Labels, gauge, labelled, render

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = resource.getpagesize()
PSEUDO_FS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "securityfs",
                       "debugfs", "tracefs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs",
                       "autofs", "binfmt_misc", "rpc_pipefs", "nsfs", "efivarfs", "selinuxfs",
                       "devtmpfs"})
CPU_ITEMS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest",
             "guest_nice")
DISK_ITEMS = ("reads", "merged", "sectors_read", "time_reading", "writes", "writes_merged",
              "sectors_written", "time_writing", "in_progress", "time_in_progress",
              "weighted_time_in_progress", "discards", "discards_merged", "sectors_discarded",
              "time_discarding", "flushes", "time_flushing")
STATUS_ITEMS = {"VmPeak": "vmpeak", "VmSize": "vmsize", "VmLck": "vmlck", "VmPin": "vmpin",
                "VmHWM": "vmhwm", "VmRSS": "vmrss", "RssAnon": "rssanon", "RssFile": "rssfile",
                "RssShmem": "rssshmem", "VmData": "vmdata", "VmStk": "vmstk", "VmExe": "vmexe",
                "VmLib": "vmlib", "VmPTE": "vmpte", "VmSwap": "vmswap",
                "HugetlbPages": "hugetlbpages", "voluntary_ctxt_switches": "voluntary_ctxt_switches",
                "nonvoluntary_ctxt_switches": "nonvoluntary_ctxt_switches"}
IO_ITEMS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes", "cancelled_write_bytes")
#: /proc/meminfo keys whose snake_case kata (Rust procfs) spells irregularly
MEMINFO_NAMES = {"HugePages_Total": "hugepages_total", "HugePages_Free": "hugepages_free",
                 "HugePages_Rsvd": "hugepages_rsvd", "HugePages_Surp": "hugepages_surp",
                 "AnonHugePages": "anon_hugepages", "ShmemHugePages": "shmem_hugepages",
                 "FileHugePages": "file_hugepages", "Percpu": "per_cpu", "DirectMap4k": "direct_map_4k",
                 "DirectMap2M": "direct_map_2M", "DirectMap4M": "direct_map_4M",
                 "DirectMap1G": "direct_map_1G", "Hugetlb": "hugetlb", "MmapCopy": "mmap_copy"}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")

_scrapes = 0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def meminfo_name(key: str) -> str:
    """``MemTotal`` → ``mem_total``, ``Active(anon)`` → ``active_anon`` (kata's item names)."""
    if key in MEMINFO_NAMES:
        return MEMINFO_NAMES[key]
    key = key.replace("(", "_").replace(")", "")
    return "_".join(p for p in _CAMEL.sub("_", key).lower().split("_") if p)


def parse_meminfo(text: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key and parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            out.append((meminfo_name(key.strip()), float(int(parts[0]) * scale)))
    return out


def parse_status(text: str) -> tuple[list[tuple[str, float]], int]:
    """(proc_status items in kB / counts, thread count) from /proc/<pid>/status."""
    items: list[tuple[str, float]] = []
    threads = 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        if key == "Threads":
            threads = int(parts[0])
        elif key in STATUS_ITEMS:
            items.append((STATUS_ITEMS[key], float(parts[0])))
    return items, threads


def parse_io(text: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in IO_ITEMS and value.strip().isdigit():
            out.append((key, float(value)))
    return out


def parse_cpu_times(text: str) -> list[tuple[str, str, float]]:
    """(cpu label, item, milliseconds) from /proc/stat's cpu lines (``total`` for the sum)."""
    out = []
    for line in text.splitlines():
        if not line.startswith("cpu"):
            break
        name, *values = line.split()
        cpu = "total" if name == "cpu" else name[3:]
        for item, ticks in zip(CPU_ITEMS, values):
            if ticks.isdigit():
                out.append((cpu, item, int(ticks) * 1000.0 / CLK_TCK))
    return out


def parse_key_values(text: str) -> list[tuple[str, float]]:
    """``key value`` lines (/proc/vmstat)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out.append((parts[0], float(parts[1])))
    return out


def parse_diskstats(text: str) -> list[tuple[str, list[float]]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 14 and all(p.isdigit() for p in parts[3:]):
            out.append((parts[2], [float(v) for v in parts[3:3 + len(DISK_ITEMS)]]))
        if len(out) >= MAX_ENTRIES:
            break
    return out


def real_mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, device) of the non-pseudo filesystems in /proc/mounts, first mount wins."""
    seen: set[str] = set()
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[2] in PSEUDO_FS or parts[1] in seen:
            continue
        mount = parts[1].replace("\\040", " ")
        seen.add(parts[1])
        out.append((mount, parts[0]))
        if len(out) >= MAX_ENTRIES:
            break
    return out


def _per_entry(name: str, help_: str, label: str, items: tuple[str, ...],
               rows: list[tuple[str, list[float]]]) -> Family:
    fam = Family(name, help_, "gauge")
    for key, values in rows:
        for item, value in zip(items, values):
            fam.add(value, ((label, key), ("item", item)))
    return fam


def agent_families(proc: str) -> list[Family]:
    global _scrapes
    _scrapes += 1
    fams = [Family("kata_agent_scrape_count", "Metrics scrape count", "counter").add(_scrapes)]
    status_items, threads = parse_status(_read(f"{proc}/self/status"))
    stat = parse_stat_fields(_read(f"{proc}/self/stat"))
    if len(stat) > 21:
        utime, stime, cutime, cstime = (int(stat[i]) for i in (11, 12, 13, 14))
        vsize, rss = int(stat[20]), int(stat[21]) * PAGE_SIZE
        fams += [gauge("kata_agent_threads", "Agent process threads", threads or int(stat[17])),
                 gauge("kata_agent_total_time", "Agent process total time", (utime + stime) / CLK_TCK),
                 gauge("kata_agent_total_vm", "Agent process total VM size", vsize),
                 gauge("kata_agent_total_rss", "Agent process total RSS size", rss),
                 labelled("kata_agent_proc_stat", "Agent process statistics.", "item",
                          [("utime", utime), ("stime", stime), ("cutime", cutime), ("cstime", cstime)]),
                 Family("kata_agent_process_cpu_seconds_total", "Total user and system CPU time spent "
                        "in seconds.", "counter").add((utime + stime) / CLK_TCK),
                 gauge("kata_agent_process_resident_memory_bytes", "Resident memory size in bytes.", rss),
                 gauge("kata_agent_process_virtual_memory_bytes", "Virtual memory size in bytes.", vsize)]
    if status_items:
        fams.append(labelled("kata_agent_proc_status", "Agent process status.", "item", status_items))
    io = parse_io(_read(f"{proc}/self/io"))
    if io:
        fams.append(labelled("kata_agent_io_stat", "Agent process IO statistics.", "item", io))
    try:
        fams.append(gauge("kata_agent_process_open_fds", "Number of open file descriptors.",
                          len(os.listdir(f"{proc}/self/fd"))))
    except OSError:
        pass
    fams.append(gauge("kata_agent_process_max_fds", "Maximum number of open file descriptors.",
                      resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    return fams


def guest_families(proc: str) -> list[Family]:
    fams: list[Family] = []
    load = _read(f"{proc}/loadavg").split()
    if len(load) >= 4 and "/" in load[3]:
        cur, _, total = load[3].partition("/")
        fams.append(labelled("kata_guest_load", "Guest system load.", "item",
                             [("load1", float(load[0])), ("load5", float(load[1])), ("load15", float(load[2]))]))
        if cur.isdigit() and total.isdigit():
            fams.append(labelled("kata_guest_tasks", "Guest system load.", "item",
                                 [("cur", float(cur)), ("max", float(total))]))
    cpu = parse_cpu_times(_read(f"{proc}/stat"))
    if cpu:
        fam = Family("kata_guest_cpu_time", "Guest CPU statistics.", "gauge")
        for label, item, ms in cpu:
            fam.add(ms, (("cpu", label), ("item", item)))
        fams.append(fam)
    vmstat = parse_key_values(_read(f"{proc}/vmstat"))
    if vmstat:
        fams.append(labelled("kata_guest_vm_stat", "Guest virtual memory statistics.", "item", vmstat))
    netdev = parse_netdev(_read(f"{proc}/net/dev"))
    if netdev:
        fams.append(_per_entry("kata_guest_netdev_stat", "Guest net devices statistics.", "interface",
                               NETDEV_ITEMS, netdev))
    disks = parse_diskstats(_read(f"{proc}/diskstats"))
    if disks:
        fams.append(_per_entry("kata_guest_diskstat", "Disks statistics in system.", "disk", DISK_ITEMS, disks))
    mem = parse_meminfo(_read(f"{proc}/meminfo"))
    if mem:
        fams.append(labelled("kata_guest_meminfo", "Statistics about memory usage in the system.", "item", mem))
    fams.extend(filesystem_families(real_mounts(_read(f"{proc}/mounts"))))
    return fams


def filesystem_families(mounts: list[tuple[str, str]]) -> list[Family]:
    by = Family("kata_guest_filesystem_bytes", "Guest filesystem space in bytes.", "gauge")
    ino = Family("kata_guest_filesystem_inodes", "Guest filesystem inodes.", "gauge")
    for mount, device in mounts:
        try:
            st = os.statvfs(mount)
        except OSError:
            continue
        labels: Labels = (("mount", mount), ("device", device))
        size = st.f_frsize or st.f_bsize
        for item, value in (("total", st.f_blocks * size), ("free", st.f_bfree * size),
                            ("avail", st.f_bavail * size), ("used", (st.f_blocks - st.f_bfree) * size)):
            by.add(value, (*labels, ("item", item)))
        for item, value in (("total", st.f_files), ("free", st.f_ffree), ("used", st.f_files - st.f_ffree)):
            ino.add(value, (*labels, ("item", item)))
    return [f for f in (by, ino) if f.samples]


def metrics_text(proc: str = "/proc") -> str:
    """The GetMetrics answer: agent families then guest families."""
    started = time.monotonic()
    fams = agent_families(proc) + guest_families(proc)
    fams.append(gauge("kata_agent_scrape_duration_seconds", "Time the agent took to collect these metrics.",
                      time.monotonic() - started))
    return render(fams)
