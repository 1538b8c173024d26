"""The one error hierarchy of kata-colo and its mapping to ttrpc/gRPC status codes.

Host and guest neutral (``common/``): the shim, the agent client, ttrpc, the hypervisor drivers
and the in-guest agent all raise these.

Every layer (shim task service, agent client, in-guest agent, hypervisor drivers, resources)
raises subclasses of :class:`KataColoError`. :func:`to_status` is the only place where an
exception becomes a wire status; :func:`from_status` is the only place where a wire status
becomes an exception again (agent client side). Nothing else maps codes.
"""
from __future__ import annotations

import asyncio
import enum

from google.protobuf.message import DecodeError


class Code(enum.IntEnum):
    """gRPC status codes as carried in google.rpc.Status.code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class KataColoError(Exception):
    """Base of all kata-colo errors. ``code`` is the status it maps to."""

    code: Code = Code.UNKNOWN

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__

    def __str__(self) -> str:
        return self.message


class InvalidArgument(KataColoError):
    code = Code.INVALID_ARGUMENT


class NotFound(KataColoError):
    code = Code.NOT_FOUND


class AlreadyExists(KataColoError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(KataColoError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(KataColoError):
    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(KataColoError):
    code = Code.DEADLINE_EXCEEDED


class Unimplemented(KataColoError):
    code = Code.UNIMPLEMENTED


class Unavailable(KataColoError):
    code = Code.UNAVAILABLE


class ConnectionClosed(Unavailable):
    """The peer closed the connection (or it broke) before answering."""


class PermissionDenied(KataColoError):
    code = Code.PERMISSION_DENIED


class Cancelled(KataColoError):
    code = Code.CANCELLED


class Internal(KataColoError):
    code = Code.INTERNAL


class ConfigError(InvalidArgument):
    """Invalid configuration file or annotation."""


class HypervisorError(Internal):
    """The VMM failed to start, crashed or refused a command."""


class AgentError(Unavailable):
    """The guest agent cannot be reached."""


class ResourceError(Internal):
    """A host resource (cgroup, tap, mount, netns) could not be set up or released."""


_BY_CODE: dict[Code, type[KataColoError]] = {
    Code.INVALID_ARGUMENT: InvalidArgument,
    Code.NOT_FOUND: NotFound,
    Code.ALREADY_EXISTS: AlreadyExists,
    Code.FAILED_PRECONDITION: FailedPrecondition,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.UNIMPLEMENTED: Unimplemented,
    Code.UNAVAILABLE: Unavailable,
    Code.PERMISSION_DENIED: PermissionDenied,
    Code.CANCELLED: Cancelled,
    Code.INTERNAL: Internal,
}


def to_status(exc: BaseException) -> tuple[int, str]:
    """Map any exception raised while serving a request to (code, message).

    Only our typed errors and a failure to decode the client's bytes say something about the
    request; every other exception is a bug of ours (or a host failure we did not type) and is
    INTERNAL, which the ttrpc server logs with its traceback (:func:`is_internal`).
    """
    if isinstance(exc, KataColoError):
        return int(exc.code), exc.message
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return int(Code.DEADLINE_EXCEEDED), str(exc) or "deadline exceeded"
    if isinstance(exc, asyncio.CancelledError):
        return int(Code.CANCELLED), "cancelled"
    if isinstance(exc, (DecodeError, UnicodeDecodeError)):
        return int(Code.INVALID_ARGUMENT), f"cannot decode request: {type(exc).__name__}: {exc}"
    return int(Code.INTERNAL), f"{type(exc).__name__}: {exc}"


def is_internal(code: int) -> bool:
    """Codes whose cause is ours to fix: the server logs their traceback."""
    return code in (Code.INTERNAL, Code.UNKNOWN)


def from_status(code: int, message: str) -> KataColoError:
    """Turn a wire status received from a peer back into the hierarchy."""
    try:
        cls = _BY_CODE.get(Code(code), KataColoError)
    except ValueError:
        cls = KataColoError
    err = cls(message)
    if cls is KataColoError:
        err.code = Code.UNKNOWN
    return err
