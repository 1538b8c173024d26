"""common.errors.to_status: our typed errors keep their code; a failure to decode the client's
bytes is INVALID_ARGUMENT; every other exception (ValueError, KeyError, TypeError from our own
code, an OSError nobody typed) is INTERNAL — never INVALID_ARGUMENT — and is_internal tells the
ttrpc server to log its traceback. from_status turns the wire code back into the class."""
from __future__ import annotations

import asyncio

import pytest
from google.protobuf.message import DecodeError

from common import errors
from common.errors import Code


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidArgument("x"), Code.INVALID_ARGUMENT),
    (errors.ConfigError("x"), Code.INVALID_ARGUMENT),
    (errors.NotFound("x"), Code.NOT_FOUND),
    (errors.FailedPrecondition("x"), Code.FAILED_PRECONDITION),
    (errors.AgentError("x"), Code.UNAVAILABLE),
    (errors.ConnectionClosed("x"), Code.UNAVAILABLE),
    (errors.ResourceError("x"), Code.INTERNAL),
    (errors.HypervisorError("x"), Code.INTERNAL),
    (DecodeError("truncated"), Code.INVALID_ARGUMENT),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), Code.INVALID_ARGUMENT),
    (TimeoutError(), Code.DEADLINE_EXCEEDED),
    (asyncio.CancelledError(), Code.CANCELLED),
    (ValueError("bad"), Code.INTERNAL),
    (KeyError("k"), Code.INTERNAL),
    (TypeError("t"), Code.INTERNAL),
    (OSError(5, "Input/output error"), Code.INTERNAL),
    (AssertionError(), Code.INTERNAL),
])
def test_to_status(exc: BaseException, code: Code):
    got, message = errors.to_status(exc)
    assert got == code
    assert message
    assert errors.is_internal(got) == (code is Code.INTERNAL)


def test_untyped_message_names_the_exception_type():
    assert errors.to_status(KeyError("container"))[1] == "KeyError: 'container'"


@pytest.mark.parametrize("code, cls", [(Code.NOT_FOUND, errors.NotFound), (Code.INTERNAL, errors.Internal),
                                       (Code.UNAVAILABLE, errors.Unavailable), (Code.DATA_LOSS, errors.KataColoError),
                                       (999, errors.KataColoError)])
def test_from_status(code: int, cls: type):
    err = errors.from_status(int(code), "m")
    assert type(err) is cls and err.message == "m"
    if cls is errors.KataColoError:
        assert err.code is Code.UNKNOWN
