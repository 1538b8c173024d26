"""Input validation shared by every RPC: ids (the one rule, :mod:`common.ids`), paths, sizes.
Failures raise InvalidArgument."""
from __future__ import annotations

import os

from common.errors import InvalidArgument
from common.ids import ID_RE, check_id  # noqa: F401 - re-exported for the agent modules

MAX_READ_LEN = 1 << 20
MAX_ARGS = 4096
MAX_ARG_LEN = 128 << 10


def check_exec_id(value: str, *, allow_empty: bool = True) -> str:
    """Exec ids follow the id rule; empty means the container's init process."""
    if value == "" and allow_empty:
        return value
    return check_id(value, "exec_id")


def path_within(path: str, base: str) -> str:
    """Return normalised absolute ``path`` if it lies inside ``base`` (symlinks not followed)."""
    if not path or "\x00" in path:
        raise InvalidArgument(f"invalid path {path!r}")
    if not os.path.isabs(path):
        raise InvalidArgument(f"path {path!r} is not absolute")
    norm = os.path.normpath(path)
    base_norm = os.path.normpath(base)
    if norm != base_norm and not norm.startswith(base_norm.rstrip("/") + "/"):
        raise InvalidArgument(f"path {path!r} is outside {base}")
    return norm


def resolved_within(path: str, base: str) -> str:
    """Like :func:`path_within` but also after resolving symlinks of existing components."""
    norm = path_within(path, base)
    real = os.path.realpath(norm)
    path_within(real, os.path.realpath(base))
    return norm


def check_read_len(length: int) -> int:
    if length <= 0 or length > MAX_READ_LEN:
        raise InvalidArgument(f"read len {length} out of range 1..{MAX_READ_LEN}")
    return length


def check_args(args: list[str]) -> list[str]:
    if not args:
        raise InvalidArgument("process args are empty")
    if len(args) > MAX_ARGS or any(len(a) > MAX_ARG_LEN or "\x00" in a for a in args):
        raise InvalidArgument("process args too long or contain NUL")
    return list(args)


def check_signal(sig: int) -> int:
    if sig <= 0 or sig > 64:
        raise InvalidArgument(f"invalid signal {sig}")
    return sig
