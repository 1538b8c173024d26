"""The real in-guest agent, run on the host as a subprocess (Unix socket listener, temp state
dir, the host's runc with --root under the temp dir), driven through AgentClient with busybox
containers: stdout/stderr, exit codes, exec, signals, stdin, tty + resize, stats, pause/resume,
update, bad requests; afterwards no runc container, process, cgroup or temp dir remains.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_api.client.rpc import AgentClient
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from proto.kata import oci_pb2
from tests.support.agent import BUSYBOX, RUNC, build_rootfs, exec_process, make_spec, read_all

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc)"),
    pytest.mark.skipif(not os.path.exists(RUNC), reason="runc not installed"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox not installed"),
]


@dataclass
class AgentEnv:
    tmp: Path
    shared: Path
    socket: str
    runc_root: Path
    cgroup_parent: str
    proc: subprocess.Popen[bytes]
    prefix: str

    def address(self) -> str:
        return f"unix://{self.socket}"

    def new_id(self, name: str) -> str:
        cid = f"{self.prefix}-{name}"
        rootfs = self.shared / cid / "rootfs"
        build_rootfs(rootfs)
        return cid


def runc_list(root: Path) -> list[dict[str, object]]:
    out = subprocess.run([RUNC, "--root", str(root), "list", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out or "null") or []


@pytest.fixture(scope="module")
def agent_env() -> Iterator[AgentEnv]:
    tmp = Path(tempfile.mkdtemp(prefix="kca-it-"))
    prefix = "t" + secrets.token_hex(4)
    state = tmp / "state"
    shared = tmp / "shared"
    shared.mkdir()
    sock = str(tmp / "agent.sock")
    cgroup_parent = f"/kata-colo-agent-{prefix}"
    log = open(tmp / "agent.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_api.agent", "--listen", f"unix:{sock}", "--state-dir", str(state),
         "--runc", RUNC, "--shared-dir", str(shared), "--cgroup-parent", cgroup_parent,
         "--no-serial", "--no-vsock", "--cmdline", "/dev/null", "--log-level", "debug"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    env = AgentEnv(tmp, shared, sock, state / "runc", cgroup_parent, proc, prefix)
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        agent_log = (tmp / "agent.log").read_text(errors="replace")
        leftovers = runc_list(env.runc_root) if env.runc_root.exists() else []
        stray = subprocess.run(["pgrep", "-f", prefix], capture_output=True, text=True).stdout.split()
        cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}") if p.exists()]
        shutil.rmtree(tmp, ignore_errors=True)
        assert rc == 0, f"agent exited {rc}\n{agent_log[-4000:]}"
        assert leftovers == [], f"runc containers left: {leftovers}"
        assert stray == [], f"processes left: {stray}"
        assert cgroups == [], f"cgroups left: {cgroups}"
        assert not tmp.exists()


@pytest.fixture
async def client(agent_env: AgentEnv) -> AgentClient:
    c = AgentClient(agent_env.address(), connect_timeout=20)
    await c.wait_ready(20)
    yield c
    await c.close()


async def test_health_and_version(client: AgentClient) -> None:
    assert await client.check() is True
    v = await client.version()
    assert v.agent_version and v.grpc_version


async def test_uname_stdout_and_exit_code(agent_env: AgentEnv, client: AgentClient) -> None:
    cid = agent_env.new_id("uname")
    await client.create_container(cid, make_spec(["uname", "-r"]))
    try:
        await client.start_container(cid)
        out = await read_all(client, cid)
        assert out.decode().strip() == os.uname().release
        assert await client.wait_process(cid) == 0
        with pytest.raises(FailedPrecondition):
            await client.start_container(cid)
    finally:
        await client.remove_container(cid)
    with pytest.raises(NotFound):
        await client.wait_process(cid)


async def test_nonzero_exit_and_stderr(agent_env: AgentEnv, client: AgentClient) -> None:
    cid = agent_env.new_id("exit3")
    await client.create_container(cid, make_spec(["sh", "-c", "echo oops >&2; exit 3"]))
    try:
        await client.start_container(cid)
        wait = asyncio.ensure_future(client.wait_process(cid))
        assert (await read_all(client, cid, stderr=True)) == b"oops\n"
        assert await read_all(client, cid) == b""
        assert await wait == 3
    finally:
        await client.remove_container(cid)


async def test_exec_signal_stdin_stats_pause(agent_env: AgentEnv, client: AgentClient) -> None:
    cid = agent_env.new_id("long")
    await client.create_container(cid, make_spec(["sleep", "300"]))
    try:
        await client.start_container(cid)
        await client.exec_process(cid, "e1", exec_process(["sh", "-c", "echo ready; exec sleep 300"]))
        assert await client.read_stdout(cid, "e1") == b"ready\n"
        await client.signal_process(cid, "e1", signal.SIGKILL)
        assert await client.wait_process(cid, "e1") == 128 + signal.SIGKILL
        with pytest.raises(NotFound):
            await client.signal_process(cid, "e1", signal.SIGKILL)

        await client.exec_process(cid, "e2", exec_process(["sh", "-c", "read x; echo got $x; exit 7"]))
        assert await client.write_stdin(cid, "e2", b"hello\n") == 6
        await client.close_stdin(cid, "e2")
        assert await read_all(client, cid, "e2") == b"got hello\n"
        assert await client.wait_process(cid, "e2") == 7

        stats = await client.stats_container(cid)
        assert stats.cgroup_stats.pids_stats.current >= 1
        assert stats.cgroup_stats.memory_stats.usage.usage > 0
        assert stats.cgroup_stats.cpu_stats.cpu_usage.total_usage > 0

        await client.update_container(cid, oci_pb2.LinuxResources(Pids=oci_pb2.LinuxPids(Limit=64)))
        await client.pause_container(cid)
        await client.resume_container(cid)

        # sleep as PID 1 does not handle SIGTERM: kata turns it into SIGKILL
        await client.signal_process(cid, "", signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await client.wait_process(cid) == 128 + signal.SIGKILL
    finally:
        await client.remove_container(cid)


async def test_terminal_init_and_exec_resize(agent_env: AgentEnv, client: AgentClient) -> None:
    cid = agent_env.new_id("tty")
    await client.create_container(cid, make_spec(["sh", "-c", "stty size; read x; echo bye"],
                                                 terminal=True, rows=30, cols=90))
    try:
        await client.start_container(cid)
        first = b""
        async with asyncio.timeout(30):
            while b"30 90" not in first:
                first += await client.read_stdout(cid)
        assert await client.read_stderr(cid) == b""

        await client.exec_process(cid, "t1", exec_process(["sh", "-c", "read line; stty size"], terminal=True))
        await client.tty_win_resize(cid, "t1", 40, 100)
        await client.write_stdin(cid, "t1", b"go\n")
        out = await read_all(client, cid, "t1")
        assert b"40 100" in out
        assert await client.wait_process(cid, "t1") == 0
        with pytest.raises(InvalidArgument):
            await client.tty_win_resize(cid, "", 0, 0)
    finally:
        await client.write_stdin(cid, "", b"x\n")
        assert b"bye" in await read_all(client, cid)
        assert await client.wait_process(cid) == 0
        await client.remove_container(cid)


async def test_bad_requests_keep_agent_serving(agent_env: AgentEnv, client: AgentClient) -> None:
    with pytest.raises(InvalidArgument):
        await client.create_container("../escape", make_spec(["true"]))
    with pytest.raises(InvalidArgument):
        spec = make_spec(["true"])
        spec.Root.Path = "/etc"
        await client.create_container(f"{agent_env.prefix}-escape", spec)
    with pytest.raises(NotFound):
        await client.start_container("no-such-container")
    with pytest.raises(InvalidArgument):
        await client.read_stdout("no-such-container", "", size=0)
    assert await client.check()
    t0 = time.monotonic()
    assert "kata_agent_process_cpu_seconds_total" in await client.get_metrics()
    details = await client.get_guest_details()
    assert details.agent_details.version
    assert time.monotonic() - t0 < 10
