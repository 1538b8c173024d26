"""Guest-agent test helpers: a busybox rootfs, kata OCI specs and processes for AgentClient,
reading a process's output to EOF, and an in-process agent on a Unix socket (no serial, no
vsock, no runc) for unit tests."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

from agent_api.agent.agent_config import AgentConfig
from agent_api.agent.server import Agent
from agent_api.client.rpc import AgentClient
from proto.kata import oci_pb2

RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def build_rootfs(rootfs: Path) -> None:
    """A minimal rootfs: the host's (static) busybox and a symlink per applet."""
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", rootfs / "bin" / applet)


def make_spec(args: list[str], *, terminal: bool = False, rows: int = 0, cols: int = 0) -> oci_pb2.Spec:
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    proc = oci_pb2.Process(
        Terminal=terminal, Args=args, Env=["PATH=/bin", "TERM=xterm"], Cwd="/",
        User=oci_pb2.User(UID=0, GID=0), NoNewPrivileges=True,
        Capabilities=oci_pb2.LinuxCapabilities(Bounding=caps, Effective=caps, Permitted=caps),
        Rlimits=[oci_pb2.POSIXRlimit(Type="RLIMIT_NOFILE", Hard=1024, Soft=1024)])
    if rows:
        proc.ConsoleSize.Height = rows
        proc.ConsoleSize.Width = cols
    mounts = [
        oci_pb2.Mount(destination="/proc", type="proc", source="proc"),
        oci_pb2.Mount(destination="/dev", type="tmpfs", source="tmpfs",
                      options=["nosuid", "strictatime", "mode=755", "size=65536k"]),
        oci_pb2.Mount(destination="/dev/pts", type="devpts", source="devpts",
                      options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
        oci_pb2.Mount(destination="/sys", type="sysfs", source="sysfs",
                      options=["nosuid", "noexec", "nodev", "ro"]),
    ]
    linux = oci_pb2.Linux(
        Resources=oci_pb2.LinuxResources(
            Devices=[oci_pb2.LinuxDeviceCgroup(Allow=False, Access="rwm", Major=-1, Minor=-1)]),
        CgroupsPath="/host/path/is/ignored",
        Namespaces=[oci_pb2.LinuxNamespace(Type=t) for t in ("pid", "ipc", "uts", "mount")]
        + [oci_pb2.LinuxNamespace(Type="network", Path="/var/run/netns/host-side")],
        MaskedPaths=["/proc/kcore"], ReadonlyPaths=["/proc/sys"])
    return oci_pb2.Spec(Version="1.0.2", Process=proc, Root=oci_pb2.Root(Path="rootfs"),
                        Hostname="ctr", Mounts=mounts, Linux=linux)


def exec_process(args: list[str], *, terminal: bool = False) -> oci_pb2.Process:
    return make_spec(args, terminal=terminal).Process


async def read_all(client: AgentClient, cid: str, exec_id: str = "", *, stderr: bool = False) -> bytes:
    """A process's stdout (or stderr) until EOF (30 s at most)."""
    reader = client.read_stderr if stderr else client.read_stdout
    chunks = []
    async with asyncio.timeout(30):
        while data := await reader(cid, exec_id):
            chunks.append(data)
    return b"".join(chunks)


def unit_agent(tmp_path: Path) -> tuple[Agent, str]:
    """An in-process agent on a Unix socket under tmp_path (no serial, no vsock, no runc)."""
    sock = str(tmp_path / "agent.sock")
    cfg = dataclasses.replace(AgentConfig(), state_dir=str(tmp_path / "state"), runc="/nonexistent/runc",
                              shared_dir=str(tmp_path / "shared"), listen=(f"unix:{sock}",),
                              use_serial=False, use_vsock=False, cgroup_parent="/kata-colo-unit-none")
    return Agent(cfg, subreaper=False), sock
