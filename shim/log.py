"""Shim logging: to the bundle's ``log`` FIFO (containerd copies it into its own log) and to a
file in the state dir. The FIFO is opened O_WRONLY|O_NONBLOCK; when nobody reads it (ENXIO) or
it is full (EAGAIN) lines are dropped there — never block the event loop on containerd."""
from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class FifoHandler(logging.Handler):
    """Non-blocking writes to a FIFO; lost lines are counted, not raised."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.lost = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            os.write(self.fd, data)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EPIPE, errno.EBADF):
                self.lost += 1
                return
            self.handleError(record)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        super().close()


def open_fifo(path: str | os.PathLike[str]) -> int | None:
    """fd of a writable log FIFO, or None when ``path`` is not a FIFO with a reader."""
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            return None
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def setup(*, debug: bool, bundle_log: str | None, log_file: Path | None) -> None:
    """Configure the root logger once for the serving daemon (or `delete`)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = []
    fd = open_fifo(bundle_log) if bundle_log else None
    if fd is not None:
        handlers.append(FifoHandler(fd))
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            handlers.append(logging.FileHandler(log_file))
        except OSError:
            pass
    if not handlers:
        handlers.append(logging.NullHandler())
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
