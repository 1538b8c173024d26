"""End to end: real containerd 1.6.20 + ctr + the installed kata-colo shim + QEMU (TCG)."""
from __future__ import annotations

import os
import platform
import pty
import re
import select
import signal
import time
from pathlib import Path

import pytest

from tests.support.containerd import IMAGE, RUNTIME, assert_nothing_left, qemu_pids, shim_processes

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]
GUEST_KERNEL = re.compile(r"^\d+\.\d+\.\d+-\d+-amd64$")


def test_uname_shows_the_guest_kernel(kata_containerd):
    c = kata_containerd
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "kc-e2e-uname", "uname", "-r")
    guest = res.stdout.decode().strip()
    assert GUEST_KERNEL.match(guest), guest
    assert guest != platform.release()
    assert_nothing_left(c, "kc-e2e-uname")


def test_exit_code_and_stdin(kata_containerd):
    c = kata_containerd
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "kc-e2e-exit", "sh", "-c", "exit 7", check=False)
    assert res.returncode == 7, res
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "kc-e2e-stdin", "head", "-n", "1",
                input=b"hi\nthere\n")
    assert res.stdout.decode().strip() == "hi"
    assert_nothing_left(c, "kc-e2e-exit")
    assert_nothing_left(c, "kc-e2e-stdin")


def test_tty(kata_containerd):
    c = kata_containerd
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("ctr", ["ctr", "-a", c.address, "run", "-t", "--rm", "--runtime", RUNTIME, IMAGE,
                          "kc-e2e-tty", "sh", "-c", "tty && stty size && echo tty-ok"])
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text and "tty-ok" in text, text
    assert "33 111" in text, text
    assert os.waitstatus_to_exitcode(status) == 0
    assert_nothing_left(c, "kc-e2e-tty")


def test_detached_exec_ps_metrics_kill(kata_containerd):
    c = kata_containerd
    cid = "kc-e2e-long"
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sh", "-c", "trap 'exit 3' TERM; while true; do sleep 1; done")
    try:
        out = c.ctr("task", "exec", "--exec-id", "x1", cid, "sh", "-c", "echo exec-$(uname -r)").stdout.decode()
        assert out.startswith("exec-") and GUEST_KERNEL.match(out.strip()[5:]), out
        res = c.ctr("task", "exec", "--exec-id", "x2", cid, "sh", "-c", "exit 5", check=False)
        assert res.returncode == 5
        ps = c.ctr("task", "ps", cid).stdout.decode()
        assert re.search(r"^\s*\d+", ps.splitlines()[1]), ps
        metrics = c.ctr("task", "metrics", cid).stdout.decode()
        assert "memory" in metrics.lower() or "cpu" in metrics.lower(), metrics
        c.ctr("task", "kill", "-s", "SIGTERM", cid)
        deadline = time.monotonic() + 30
        while "STOPPED" not in c.ctr("task", "ls").stdout.decode() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "STOPPED" in c.ctr("task", "ls").stdout.decode()
    finally:
        c.ctr("task", "rm", "-f", cid, check=False)
        c.ctr("container", "rm", cid, check=False)
    assert_nothing_left(c, cid)


def test_sigkill_of_qemu_reports_exit_and_leaves_nothing(kata_containerd):
    c = kata_containerd
    cid = "kc-e2e-qemukill"
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    try:
        pids = qemu_pids(cid)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "STOPPED" not in c.ctr("task", "ls").stdout.decode() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "STOPPED" in c.ctr("task", "ls").stdout.decode()
    finally:
        c.ctr("task", "rm", "-f", cid, check=False)
        c.ctr("container", "rm", cid, check=False)
    assert_nothing_left(c, cid)


def test_sigkill_of_shim_then_delete_cleans_up(kata_containerd):
    c = kata_containerd
    cid = "kc-e2e-shimkill"
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    try:
        assert qemu_pids(cid)
        shims = [int(ln.split()[0]) for ln in shim_processes(str(c.dir)) if cid in ln]
        assert len(shims) == 1, shim_processes(str(c.dir))
        os.kill(shims[0], signal.SIGKILL)
        time.sleep(1)
    finally:
        c.ctr("task", "rm", "-f", cid, check=False)
        c.ctr("container", "rm", cid, check=False)
    assert_nothing_left(c, cid)


def test_two_containers_in_one_sandbox_share_one_vm(kata_containerd):
    c = kata_containerd
    pod, second = "kc-e2e-pod", "kc-e2e-pod-c2"
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, pod, "sleep", "600")
    try:
        c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"io.kubernetes.cri.sandbox-id={pod}",
              IMAGE, second, "sleep", "600")
        assert len(qemu_pids(pod)) == 1
        boot1 = c.ctr("task", "exec", "--exec-id", "b1", pod, "cat", "/proc/sys/kernel/random/boot_id").stdout
        boot2 = c.ctr("task", "exec", "--exec-id", "b2", second, "cat", "/proc/sys/kernel/random/boot_id").stdout
        assert boot1 == boot2 and boot1.strip()
    finally:
        for cid in (second, pod):
            c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        time.sleep(1)
        for cid in (second, pod):
            c.ctr("task", "rm", "-f", cid, check=False)
            c.ctr("container", "rm", cid, check=False)
    assert_nothing_left(c, pod)


@pytest.mark.parametrize("args, message", [
    (["--annotation", "io.katacontainers.config.hypervisor.default_vcpus=lots"], "not an integer"),
    (["--annotation", "io.katacontainers.config.hypervisor.kernel=/tmp/evil"], "not enabled"),
    (["--mount", "type=bind,src=/nonexistent-kc-e2e,dst=/data,options=rbind"], "does not exist"),
])
def test_invalid_input_is_a_clear_error_and_leaves_nothing(kata_containerd, args, message):
    c = kata_containerd
    cid = "kc-e2e-bad"
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, *args, IMAGE, cid, "true", check=False)
    c.ctr("container", "rm", cid, check=False)
    assert res.returncode != 0
    assert message in res.stderr.decode(), res.stderr
    assert_nothing_left(c, cid)


def test_vcpu_priorities_through_ctr(kata_containerd):
    """Pod annotations → host vCPU threads in vcpu-<prio> cgroups → guest priority cpusets →
    a container annotated `low` runs only on the low vCPU."""
    c = kata_containerd
    cid = "kc-e2e-colo"
    res = c.ctr("run", "--rm", "--runtime", RUNTIME,
                "--annotation", "io.katacontainers.config.hypervisor.default_vcpus=2",
                "--annotation", "io.katacontainers.colo.vcpu-priorities=high:1,low:1",
                "--annotation", "io.katacontainers.colo.container-priority=low",
                IMAGE, cid, "sh", "-c", "grep Cpus_allowed_list /proc/self/status; "
                "ls /sys/fs/cgroup/cpu/kata-colo/ 2>/dev/null; nproc")
    out = res.stdout.decode()
    assert re.search(r"Cpus_allowed_list:\s+1$", out, re.M), out
    assert_nothing_left(c, cid)
    assert not Path(f"/sys/fs/cgroup/cpu/kata-colo/{cid}").exists()


def test_unknown_vcpu_priority_is_rejected(kata_containerd):
    c = kata_containerd
    cid = "kc-e2e-colo-bad"
    res = c.ctr("run", "--rm", "--runtime", RUNTIME,
                "--annotation", "io.katacontainers.colo.vcpu-priorities=urgent:1",
                IMAGE, cid, "true", check=False)
    c.ctr("container", "rm", cid, check=False)
    assert res.returncode != 0 and "urgent" in res.stderr.decode(), res.stderr
    assert_nothing_left(c, cid)
