"""The OCI runtime (runc) command line, run through the agent's reaper.

create/exec pass the container's stdio through runc (runc hands its own fds 0-2 to the container
process) or use ``--console-socket``. runc's own diagnostics go to a JSON log file whose last
error becomes the error message; "does not exist" maps to NotFound.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass

from agent_api.agent.reaper import Reaper, run, spawn
from common.errors import AlreadyExists, DeadlineExceeded, Internal, KataColoError, NotFound

#: runc create normally takes 1-4 s here (TCG); a run past this bound is hung, not slow: it is
#: killed and tried once more (containers.create), within the host's CreateContainer deadline
CREATE_TIMEOUT = 40.0
CMD_TIMEOUT = 60.0


@dataclass(frozen=True)
class Stdio:
    stdin: int | None
    stdout: int | None
    stderr: int | None


def _error(what: str, message: str) -> KataColoError:
    text = f"runc {what}: {message.strip() or 'failed'}"
    low = message.lower()
    # only runc's "container does not exist" means NotFound; ENOENT/ENXIO inside a failed
    # create/exec ("no such file", "executable file not found") is the workload's problem
    if "does not exist" in low and "container" in low:
        return NotFound(text)
    if "already exists" in low:
        return AlreadyExists(text)
    return Internal(text)


def last_log_error(path: str) -> str:
    """The last error-level message of runc's JSON log (or its last line)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    last = ""
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            last = line or last
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            last = str(entry.get("msg", ""))
    return last


class Runc:
    def __init__(self, reaper: Reaper, binary: str, root: str, *, no_pivot: bool = False) -> None:
        self.reaper = reaper
        self.binary = binary
        self.root = root
        self.no_pivot = no_pivot

    def _argv(self, log: str | None, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if log:
            argv += ["--log", log, "--log-format", "json"]
        return argv + list(args)

    async def _passthrough(self, what: str, argv: list[str], stdio: Stdio, log: str,
                           timeout: float | None = None) -> None:
        try:
            pid = spawn(argv, stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr)
        except OSError as exc:
            raise Internal(f"cannot run {self.binary}: {exc}") from None
        exited = self.reaper.watch(pid)
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await exited
            raise DeadlineExceeded(f"runc {what} did not finish in {timeout:.0f}s (killed); "
                                   f"last runc log: {last_log_error(log) or '-'}") from None
        if code != 0:
            raise _error(what, last_log_error(log) or f"exit status {code}")

    async def create(self, cid: str, bundle: str, pid_file: str, stdio: Stdio, *,
                     console_socket: str | None = None) -> None:
        log = os.path.join(bundle, "runc.log")
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if self.no_pivot:
            args.append("--no-pivot")
        await self._passthrough("create", self._argv(log, *args, cid), stdio, log, timeout=CREATE_TIMEOUT)

    async def exec(self, cid: str, process_json: str, pid_file: str, stdio: Stdio, *, log: str,
                   console_socket: str | None = None) -> None:
        args = ["exec", "--process", process_json, "--pid-file", pid_file, "--detach"]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._passthrough("exec", self._argv(log, *args, cid), stdio, log)

    async def _simple(self, what: str, *args: str, input: bytes | None = None,
                      timeout: float = CMD_TIMEOUT) -> bytes:
        result = await run(self.reaper, self._argv(None, *args), input=input, timeout=timeout)
        if result.code != 0:
            raise _error(what, result.stderr.decode("utf-8", "replace")[-2000:]
                         or f"exit status {result.code}")
        return result.stdout

    async def start(self, cid: str) -> None:
        await self._simple("start", "start", cid)

    async def delete(self, cid: str, *, force: bool = True) -> None:
        await self._simple("delete", "delete", *(["--force"] if force else []), cid)

    async def kill(self, cid: str, sig: int, *, all_processes: bool = False) -> None:
        await self._simple("kill", "kill", *(["--all"] if all_processes else []), cid, str(sig))

    async def pause(self, cid: str) -> None:
        await self._simple("pause", "pause", cid)

    async def resume(self, cid: str) -> None:
        await self._simple("resume", "resume", cid)

    async def update(self, cid: str, resources: dict[str, object]) -> None:
        await self._simple("update", "update", "--resources", "-", cid,
                           input=json.dumps(resources).encode())

    async def ps(self, cid: str) -> list[int]:
        out = await self._simple("ps", "ps", "--format", "json", cid)
        pids = json.loads(out or b"null") or []
        return [int(p) for p in pids]

    async def state(self, cid: str) -> dict[str, object]:
        out = await self._simple("state", "state", cid)
        data = json.loads(out)
        if not isinstance(data, dict):
            raise Internal(f"runc state {cid}: unexpected output")
        return data
