"""QemuHypervisor's leftover-VMM check: a process counts as alive while ANY of its threads runs.
After SIGKILL the thread-group leader turns zombie before its other threads have exited, and
those still hold the VMM's cgroups (rmdir → EBUSY): recovery must wait for all of them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from hypervisor.vmm_process import pid_alive as _pid_alive

# the main thread leaves with pthread_exit: the leader is a zombie, the other thread runs on
ZOMBIE_LEADER = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(60,)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def leader_state(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0]


def test_a_zombie_leader_with_a_live_thread_is_alive():
    proc = subprocess.Popen([sys.executable, "-c", ZOMBIE_LEADER], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 5
        while leader_state(proc.pid) != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _pid_alive(proc.pid)                # the leader alone would say "dead"
        os.kill(proc.pid, signal.SIGKILL)
        while _pid_alive(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert not _pid_alive(proc.pid)
