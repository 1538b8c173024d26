"""What makes a restored template clone a machine of its own (kata's ReseedRandomDev and
SetGuestDateTime; the hostname comes with CreateSandbox).

Every clone resumes with the template's kernel RNG state and the clock of the moment the
template was saved. ``reseed`` mixes host-supplied random bytes into the input pool with
``RNDADDENTROPY`` (credited: they come from the host's /dev/urandom) and forces a CRNG reseed
with ``RNDRESEEDCRNG``, as kata's agent does, so two clones stop producing the same stream.
``set_time`` sets CLOCK_REALTIME. Both validate their input (the RPC is the host's, but a
bound costs nothing).
"""
from __future__ import annotations

import fcntl
import os
import struct
import time
from collections.abc import Callable

from common.errors import InvalidArgument, ResourceError

RANDOM_DEV = "/dev/random"
RNDADDENTROPY = 0x40085203   # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207       # _IO('R', 0x07)
MAX_SEED_BYTES = 4096
MIN_SEED_BYTES = 16
# 2000-01-01 .. 2200-01-01: anything else is a host bug, not a time to run with
MIN_SEC, MAX_SEC = 946684800, 7258118400


def entropy_request(data: bytes) -> bytes:
    """``struct rand_pool_info {int entropy_count; int buf_size; __u32 buf[]}`` for ``data``
    (entropy credited in bits, padded to whole 32-bit words)."""
    padded = data + b"\0" * (-len(data) % 4)
    return struct.pack("ii", len(data) * 8, len(data)) + padded


def reseed(data: bytes, device: str = RANDOM_DEV) -> None:
    if not MIN_SEED_BYTES <= len(data) <= MAX_SEED_BYTES:
        raise InvalidArgument(f"reseed data must be {MIN_SEED_BYTES}..{MAX_SEED_BYTES} bytes, not {len(data)}")
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ResourceError(f"cannot open {device}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, entropy_request(data))
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise ResourceError(f"reseeding {device}: {exc.strerror}") from None
    finally:
        os.close(fd)


def set_time(sec: int, usec: int, clock_settime: Callable[[int, int], None] = time.clock_settime_ns) -> None:
    if not MIN_SEC <= sec <= MAX_SEC or not 0 <= usec < 1_000_000:
        raise InvalidArgument(f"invalid guest time {sec}.{usec:06d}")
    try:
        clock_settime(time.CLOCK_REALTIME, sec * 1_000_000_000 + usec * 1000)
    except OSError as exc:
        raise ResourceError(f"setting the guest clock: {exc.strerror}") from None
