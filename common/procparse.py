"""Parsers of Linux /proc text shared by the in-guest agent (guest metrics) and the host (shim
metrics of the shim and VMM processes). Pure functions of the file text; malformed lines are
skipped, never raised on (the text may come from an untrusted guest or a dying process)."""
from __future__ import annotations

MAX_ENTRIES = 64
#: /proc/net/dev columns in kata's item names (prometheus/procfs NetDevLine order)
NETDEV_ITEMS = ("recv_bytes", "recv_packets", "recv_errs", "recv_drop", "recv_fifo", "recv_frame",
                "recv_compressed", "recv_multicast", "sent_bytes", "sent_packets", "sent_errs",
                "sent_drop", "sent_fifo", "sent_colls", "sent_carrier", "sent_compressed")


def stat_fields(text: str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: index 0 is field 3 (state), 11/12 are
    utime/stime, 13/14 cutime/cstime, 17 num_threads, 19 starttime, 20 vsize, 21 rss (pages)."""
    return text.rsplit(")", 1)[1].split() if ")" in text else []


def netdev(text: str, limit: int = MAX_ENTRIES) -> list[tuple[str, list[float]]]:
    """(interface, the 16 counters in :data:`NETDEV_ITEMS` order) from /proc/<pid>/net/dev."""
    out = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        values = rest.split()
        if sep and len(values) >= len(NETDEV_ITEMS) and all(v.isdigit() for v in values):
            out.append((name.strip(), [float(v) for v in values[:len(NETDEV_ITEMS)]]))
        if len(out) >= limit:
            break
    return out
