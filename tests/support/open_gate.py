"""Hold a process at its next file creation in a directory (fanotify permission events, root).

The sandbox journals before it acts: every step of a boot starts with a new version of
``<state>/resources.json`` (a temp file ``.resources.*`` renamed over it). :class:`OpenGate`
holds the shim inside ``open(2)`` of each such temp file until the test releases it, so a test
can stop a boot *exactly* after journal version N was published and before N+1 is written —
e.g. kill it there — instead of racing it with signals. Opens by other processes, or of other
files, are allowed at once by a responder thread (the test's own reads of the journal too).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import select
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

FAN_CLASS_CONTENT = 0x04
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_MARK_ADD = 0x01
FAN_OPEN_PERM = 0x00010000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x01
AT_FDCWD = -100
_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


@dataclass
class Held:
    """One open(2) the gated process is blocked in."""

    fd: int
    name: str


class OpenGate:
    def __init__(self, directory: Path, pid: int, prefix: str = ".resources.") -> None:
        self.directory = directory
        self.pid = pid
        self.prefix = prefix
        self._fd = -1
        self._held: queue.Queue[Held] = queue.Queue()
        self._pending: list[Held] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._respond, name="open-gate", daemon=True)

    def __enter__(self) -> OpenGate:
        fd = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_LARGEFILE)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        self._fd = fd
        if _libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN_PERM | FAN_EVENT_ON_CHILD, AT_FDCWD,
                               os.fsencode(self.directory)) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"fanotify_mark {self.directory}")
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._stop.set()
        self._thread.join(5)
        while True:
            try:
                self._pending.append(self._held.get_nowait())
            except queue.Empty:
                break
        for held in self._pending:
            self._answer(held.fd)
        self._pending.clear()
        os.close(self._fd)

    def _answer(self, event_fd: int) -> None:
        with contextlib.suppress(OSError):  # the opener may be dead (SIGKILL): nothing to answer
            os.write(self._fd, struct.pack("=iI", event_fd, FAN_ALLOW))
        with contextlib.suppress(OSError):
            os.close(event_fd)

    def _respond(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            try:
                data = os.read(self._fd, 64 * _META.size)
            except BlockingIOError:
                continue
            offset = 0
            while offset + _META.size <= len(data):
                event_len, _vers, _res, _mlen, _mask, event_fd, pid = _META.unpack_from(data, offset)
                offset += event_len
                try:
                    name = os.path.basename(os.readlink(f"/proc/self/fd/{event_fd}"))
                except OSError:
                    name = ""
                if pid == self.pid and name.startswith(self.prefix):
                    self._held.put(Held(event_fd, name))
                else:
                    self._answer(event_fd)

    def next(self, timeout: float) -> Held:
        """Wait until the process is blocked creating its next ``prefix*`` file."""
        try:
            held = self._held.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"pid {self.pid} created no {self.prefix}* file in {timeout}s") from None
        self._pending.append(held)
        return held

    def release(self, held: Held) -> None:
        self._pending.remove(held)
        self._answer(held.fd)
