"""runc error mapping and the console-socket path with a fake runc (a Python script): a runc
that hangs up the console socket without a pty must surface runc's own error."""
from __future__ import annotations

import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_api.agent.guest_process import StdioSetup
from agent_api.agent.reaper import Reaper
from agent_api.agent.runc import Runc, _error
from common.errors import AlreadyExists, Internal, NotFound

FAKE_RUNC = f"""#!{sys.executable}
import json, socket, sys
args = sys.argv[1:]
log = args[args.index("--log") + 1] if "--log" in args else None
def fail(msg):
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({{"level": "info", "msg": "starting"}}) + "\\n")
            f.write(json.dumps({{"level": "error", "msg": msg}}) + "\\n")
    sys.exit(1)
if "--console-socket" in args:
    s = socket.socket(socket.AF_UNIX)
    s.connect(args[args.index("--console-socket") + 1])
    s.close()   # hang up without sending a pty master
    fail("exec failed: unable to start container process: open /dev/ptmx: no such file or directory")
if "delete" in args:
    sys.stderr.write("container does not exist")
    sys.exit(1)
fail("exec failed: executable file not found in $PATH")
"""


@pytest.fixture
async def runc(tmp_path: Path) -> AsyncIterator[Runc]:
    binary = tmp_path / "runc"
    binary.write_text(FAKE_RUNC)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    reaper = Reaper()
    reaper.install(subreaper=False)
    try:
        yield Runc(reaper, str(binary), str(tmp_path / "root"))
    finally:
        reaper.uninstall()


@pytest.mark.parametrize("message,cls", [
    ("container does not exist", NotFound),
    ("container with given ID already exists", AlreadyExists),
    ("unable to start container process: open /dev/ptmx: no such file or directory", Internal),
    ("exec failed: executable file not found in $PATH", Internal),
    ("error creating device nodes: mknod /x/dev/null: no such device or address", Internal),
])
def test_error_mapping(message: str, cls: type) -> None:
    err = _error("create", message)
    assert type(err) is cls
    assert message in err.message


async def test_console_hangup_reports_runc_error(runc: Runc, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    stdio = StdioSetup(terminal=True)
    sockdir = os.path.dirname(stdio.console_path or "")
    with pytest.raises(Internal, match="/dev/ptmx"):
        await stdio.run(runc.create("c1", str(bundle), str(bundle / "pid"), stdio.runc_stdio,
                                    console_socket=stdio.console_path))
    stdio.close()
    assert not os.path.exists(sockdir)


async def test_pipe_create_failure_is_internal_with_log_message(runc: Runc, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    before = set(os.listdir("/proc/self/fd"))
    stdio = StdioSetup(terminal=False)
    with pytest.raises(Internal, match="executable file not found"):
        await stdio.run(runc.create("c1", str(bundle), str(bundle / "pid"), stdio.runc_stdio))
    stdio.close()
    assert set(os.listdir("/proc/self/fd")) == before  # all six pipe ends closed


async def test_delete_of_unknown_container_is_not_found(runc: Runc) -> None:
    with pytest.raises(NotFound):
        await runc.delete("c1")


HANGING_RUNC = f"""#!{sys.executable}
import json, sys, time
args = sys.argv[1:]
log = args[args.index("--log") + 1] if "--log" in args else None
if log:
    with open(log, "a") as f:
        f.write(json.dumps({{"level": "error", "msg": "stuck in nsexec"}}) + "\\n")
time.sleep(600)
"""


async def test_a_hung_runc_create_is_killed_with_a_deadline_error(tmp_path: Path, monkeypatch) -> None:
    from agent_api.agent import runc as runc_mod
    from common.errors import DeadlineExceeded

    monkeypatch.setattr(runc_mod, "CREATE_TIMEOUT", 0.5)
    binary = tmp_path / "runc"
    binary.write_text(HANGING_RUNC)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    bundle = tmp_path / "b"
    bundle.mkdir()
    reaper = Reaper()
    reaper.install(subreaper=False)
    try:
        r = Runc(reaper, str(binary), str(tmp_path / "root"))
        stdio = StdioSetup(terminal=False)
        with pytest.raises(DeadlineExceeded, match="stuck in nsexec"):
            await r.create("c1", str(bundle), str(bundle / "pid"), stdio.runc_stdio)
        stdio.close()
    finally:
        reaper.uninstall()
    import subprocess

    left = subprocess.run(["pgrep", "-f", str(binary)], capture_output=True, text=True).stdout.split()
    assert not left  # the hung runc was killed and reaped
