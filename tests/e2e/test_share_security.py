"""The host side of the sandbox share, tested the way its defects were found (issue 10), with
real containerd and QEMU:

* a read-only volume (``--mount ...,options=rbind:ro``) is read-only on the HOST side of the 9p
  share too (``ro,nosuid,nodev`` in /proc/self/mountinfo; a write through it fails on the host),
  so a compromised guest kernel cannot write it; the container still reads its content and
  cannot write it;
* a setuid-root binary made inside a container (container root, no guest compromise) gives no
  host user root: every host path to it is unreachable for ``nobody`` (the sandbox state dir and
  the share are 0700, containerd's dirs are private), and even executed through an open file
  descriptor it runs without privileges (the share's binds and the bundle rootfs are nosuid).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.mount import mountinfo
from tests.support.containerd import IMAGE, RUNTIME, STATE_ROOT, Containerd, assert_nothing_left

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]

NOBODY = 65534

# Drop to nobody (no groups), then exec argv[2:] from a path or an inherited fd ("fd:N");
# an exec failure is reported as "exec failed: errno N".
_AS_NOBODY = """
import os, sys
target = sys.argv[1]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    os.execve(int(target[3:]) if target.startswith("fd:") else target, sys.argv[2:], {"PATH": "/bin"})
except OSError as exc:
    print(f"exec failed: errno {exc.errno}", flush=True)
    sys.exit(126)
"""


def as_nobody(target: str, *argv: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _AS_NOBODY, target, *argv], capture_output=True, text=True,
                          timeout=30, pass_fds=pass_fds)


def mount_of(path: Path) -> dict[str, str]:
    """The mountinfo entry mounted exactly at ``path`` (the top one)."""
    entries = [m for m in mountinfo() if m["mount_point"] == str(path)]
    assert entries, f"nothing mounted at {path}"
    return entries[-1]


def options(path: Path) -> set[str]:
    return set(mount_of(path)["options"].split(","))


def exec_in(c: Containerd, cid: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return c.ctr("task", "exec", "--exec-id", f"x{time.monotonic_ns()}", cid, *argv, check=check)


def remove(c: Containerd, cid: str) -> None:
    c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    for _ in range(100):
        if c.ctr("task", "rm", cid, check=False).returncode == 0:
            break
        time.sleep(0.2)
    c.ctr("container", "rm", cid, check=False)


def test_read_only_volume_is_read_only_on_the_host_side(kata_containerd: Containerd, tmp_path: Path):
    c = kata_containerd
    cid = "kc-sec-rovol"
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data.txt").write_text("kata-colo read-only volume\n")
    listing = sorted(os.listdir(vol))
    c.ctr("run", "-d", "--runtime", RUNTIME, "--mount", f"type=bind,src={vol},dst=/data,options=rbind:ro",
          IMAGE, cid, "sleep", "600")
    try:
        share = STATE_ROOT / cid / "shared"
        binds = [Path(m["mount_point"]) for m in mountinfo()
                 if m["mount_point"].startswith(f"{share}/") and os.path.samefile(m["mount_point"], vol)]
        assert len(binds) == 1, [m for m in mountinfo() if str(share) in m["mount_point"]]
        bind = binds[0]
        assert {"ro", "nosuid", "nodev"} <= options(bind), mount_of(bind)
        with pytest.raises(OSError) as err:  # what a compromised guest kernel's 9p writes hit
            (bind / "from-the-share").write_text("x")
        assert err.value.errno == errno.EROFS
        # the container sees the content and cannot write it
        assert exec_in(c, cid, "cat", "/data/data.txt").stdout == b"kata-colo read-only volume\n"
        res = exec_in(c, cid, "sh", "-c", "echo x > /data/new", check=False)
        assert res.returncode != 0 and b"Read-only file system" in res.stderr, res
    finally:
        remove(c, cid)
    assert sorted(os.listdir(vol)) == listing
    assert (vol / "data.txt").read_text() == "kata-colo read-only volume\n"
    assert_nothing_left(c, cid)


def run_fd_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    """Open ``path`` as root, exec it as nobody through the fd (no path lookup at all)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.set_inheritable(fd, True)
        return as_nobody(f"fd:{fd}", "id", pass_fds=(fd,))
    finally:
        os.close(fd)


def test_setuid_binary_from_a_container_gives_no_host_user_root(kata_containerd: Containerd, tmp_path: Path):
    """As found: ``cp /bin/busybox /evil2 && chmod 4755 /evil2`` in a container. busybox drops a
    setuid for applets such as ``id``, so the euid check uses a second file: the host's coreutils
    ``id`` (which shows ``euid=0`` when it is raised), copied and made setuid by the container
    the same way; a control copy on a suid-capable host directory shows the check can fail."""
    c = kata_containerd
    cid = "kc-sec-suid"
    tools = tmp_path / "tools"
    tools.mkdir()
    shutil.copy2("/usr/bin/id", tools / "id")
    # the 9p rootfs is the path where the guest's writes land in a host directory (with the
    # default block rootfs they land in the container's scratch disk image: see the next test)
    c.ctr("run", "-d", "--runtime", RUNTIME, "--mount", f"type=bind,src={tools},dst=/tools,options=rbind:ro",
          "--annotation", "io.katacontainers.config.hypervisor.disable_block_device_use=true",
          IMAGE, cid, "sleep", "600")
    try:
        # container root, no guest compromise (busybox is static in the test image)
        exec_in(c, cid, "sh", "-c", "cp /bin/busybox /evil2 && chmod 4755 /evil2 && "
                                    "cp /tools/id /evil3 && chmod 4755 /evil3")
        state = STATE_ROOT / cid
        share_rootfs = state / "shared" / cid / "rootfs"
        bundle_rootfs = c.dir / "state" / "io.containerd.runtime.v2.task" / c.namespace / cid / "rootfs"
        overlay = mount_of(bundle_rootfs)
        upper = Path(next(o.split("=", 1)[1] for o in overlay["super_options"].split(",")
                          if o.startswith("upperdir=")))
        places = {"share": share_rootfs, "bundle": bundle_rootfs, "snapshot": upper}
        for where, root in places.items():  # the attack's premise: setuid-root files on the host
            for name in ("evil2", "evil3"):
                st = (root / name).stat()
                assert st.st_uid == 0 and st.st_mode & stat.S_ISUID, (where, name, oct(st.st_mode))

        # 1. no path to them is reachable for another host user
        for where, root in places.items():
            for name in ("evil2", "evil3"):
                res = as_nobody(str(root / name), "id")
                assert res.returncode == 126 and f"errno {errno.EACCES}" in res.stdout, (where, name, res)
        for d in (state, state / "shared"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d

        # 2. the mounts they are reached through are nosuid,nodev: even through an fd (no path
        #    lookup) the binary runs without raised privileges
        assert {"nosuid", "nodev"} <= options(share_rootfs), mount_of(share_rootfs)
        assert {"nosuid", "nodev"} <= options(bundle_rootfs), overlay
        for where in ("share", "bundle"):
            res = run_fd_as_nobody(places[where] / "evil3")
            assert res.returncode == 0 and res.stdout.startswith(f"uid={NOBODY}("), (where, res)
            assert "euid=" not in res.stdout, (where, res.stdout)

        # control: the same bytes, setuid root on a suid-capable host directory, do run as root
        control_dir = Path(tempfile.mkdtemp(prefix="kc-suid-control-", dir="/var/tmp"))
        try:
            control = control_dir / "evil3"
            shutil.copyfile(share_rootfs / "evil3", control)
            os.chmod(control, 0o4755)
            if "nosuid" in options_of_fs(control_dir):
                pytest.skip("no suid-capable host directory for the control")
            assert "euid=0(root)" in run_fd_as_nobody(control).stdout
        finally:
            shutil.rmtree(control_dir)
    finally:
        remove(c, cid)
    assert_nothing_left(c, cid)


def options_of_fs(path: Path) -> set[str]:
    """Per-mount options of the mount ``path`` lives on."""
    best = max((m for m in mountinfo() if str(path).startswith(m["mount_point"].rstrip("/") + "/")
                or m["mount_point"] == "/"), key=lambda m: len(m["mount_point"]))
    return set(best["options"].split(","))


def test_setuid_binary_on_the_block_rootfs_never_reaches_a_host_directory(kata_containerd: Containerd):
    """With the default block rootfs the container's writes go to its scratch disk (an ext4 image
    the host never mounts): the setuid file exists on no host path at all."""
    c = kata_containerd
    cid = "kc-sec-suid-blk"
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    try:
        exec_in(c, cid, "sh", "-c", "cp /bin/busybox /evil2 && chmod 4755 /evil2 && ls -l /evil2")
        state = STATE_ROOT / cid
        bundle_rootfs = c.dir / "state" / "io.containerd.runtime.v2.task" / c.namespace / cid / "rootfs"
        assert not (state / "shared" / cid / "rootfs").exists()
        assert not (bundle_rootfs / "evil2").exists()
        found = [p for root in (state, c.dir) for p in root.rglob("evil2")]
        assert not found, found
    finally:
        remove(c, cid)
    assert_nothing_left(c, cid)
