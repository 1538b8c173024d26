"""A VMM process seen from the host, shared by the drivers: is it still alive (every thread,
not only the leader), and the tail of one of its log files for an error message."""
from __future__ import annotations

import os

TAIL_BYTES = 2048


def tail(path: str, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of ``path`` as text ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - limit, 0))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True while any thread of ``pid`` still runs. The leader of a SIGKILLed process is a
    zombie while its other threads are still exiting, and those still hold its cgroups (rmdir
    EBUSY): "dead" means every thread is."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            return True
    return False
