"""Guest side of ``kata-colo-ctl exec``: the kata_colo.v1.Debug service.

``Exec`` runs one command in the guest's own namespaces (outside every container), feeds it the
request's stdin, waits at most the request's timeout and returns its exit status and output,
each stream capped at :data:`MAX_OUTPUT` (the rest is drained and dropped, flagged truncated).
No shell is involved. The service is registered only when the kernel command line carries
``agent.debug_console`` (:func:`enabled`), which the shim adds only for
``[agent.kata] debug_console_enabled = true`` — kata's switch for its debug console.
"""
from __future__ import annotations

import os
import shutil

from agent_api.agent.agent_config import parse_cmdline
from agent_api.agent.reaper import Reaper, run
from common.errors import InvalidArgument, NotFound
from proto.kata_colo import debug_pb2
from ttrpc import ServerContext

CMDLINE_KEY = "debug_console"
MAX_ARGS = 256
MAX_ARG = 4096
MAX_ENV = 64
MAX_STDIN = 1 << 20
MAX_OUTPUT = 1 << 20
DEFAULT_TIMEOUT = 30
MAX_TIMEOUT = 300
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def enabled(cmdline_path: str = "/proc/cmdline") -> bool:
    """True when the guest kernel command line has ``agent.debug_console``."""
    try:
        with open(cmdline_path) as f:
            text = f.read()
    except OSError:
        return False
    return CMDLINE_KEY in parse_cmdline(text)


def validate(req: debug_pb2.ExecRequest) -> tuple[list[str], dict[str, str], int]:
    """(argv, environment, timeout seconds) of a request; InvalidArgument when out of bounds."""
    argv = list(req.argv)
    if not argv or not argv[0]:
        raise InvalidArgument("exec: empty command")
    if len(argv) > MAX_ARGS or any(len(a) > MAX_ARG or "\0" in a for a in argv):
        raise InvalidArgument(f"exec: at most {MAX_ARGS} arguments of {MAX_ARG} bytes, without NUL")
    if len(req.stdin) > MAX_STDIN:
        raise InvalidArgument(f"exec: stdin larger than {MAX_STDIN} bytes")
    if req.timeout_seconds > MAX_TIMEOUT:
        raise InvalidArgument(f"exec: timeout {req.timeout_seconds}s above {MAX_TIMEOUT}s")
    env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "HOME": "/root", "TERM": "dumb"}
    if len(req.env) > MAX_ENV:
        raise InvalidArgument(f"exec: at most {MAX_ENV} environment entries")
    for entry in req.env:
        key, sep, value = entry.partition("=")
        if not sep or not key or "\0" in entry or len(entry) > MAX_ARG:
            raise InvalidArgument(f"exec: bad environment entry {entry[:64]!r} (want KEY=VALUE)")
        env[key] = value
    return argv, env, req.timeout_seconds or DEFAULT_TIMEOUT


class DebugService:
    """kata_colo.v1.Debug handlers."""

    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper

    async def Exec(self, req: debug_pb2.ExecRequest, ctx: ServerContext) -> debug_pb2.ExecResponse:
        argv, env, timeout = validate(req)
        if shutil.which(argv[0], path=env["PATH"]) is None:
            raise NotFound(f"exec: {argv[0][:256]}: command not found in the guest")
        result = await run(self.reaper, argv, input=bytes(req.stdin), timeout=float(timeout),
                           max_output=MAX_OUTPUT + 1, env=env)
        return debug_pb2.ExecResponse(
            exit_code=result.code, stdout=result.stdout[:MAX_OUTPUT], stderr=result.stderr[:MAX_OUTPUT],
            stdout_truncated=len(result.stdout) > MAX_OUTPUT, stderr_truncated=len(result.stderr) > MAX_OUTPUT)
