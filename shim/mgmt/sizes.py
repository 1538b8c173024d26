"""Memory sizes as operators write them: ``1536M``, ``1.5G``, ``512MiB``, ``2g``, ``1048576``.

Suffixes are binary (K/M/G/T = 2^10/2^20/2^30/2^40, with or without ``i``/``iB``/``B``), as
``kata-colo-ctl mem`` and the resourced policy file use them; a bare number is bytes. The
result is a whole number of bytes; anything else is InvalidArgument naming the text.
"""
from __future__ import annotations

import re

from common.errors import InvalidArgument

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
MAX_SIZE = 1 << 50


def parse_size(text: str | int) -> int:
    """Bytes of ``text`` (an int is taken as bytes)."""
    if isinstance(text, bool):
        raise InvalidArgument(f"not a memory size: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if m is None:
            raise InvalidArgument(f"not a memory size: {str(text)[:40]!r} (e.g. 1536M, 1.5G, 1073741824)")
        number, unit = m.group(1), m.group(2).lower()
        if unit == "" and "." in number:
            raise InvalidArgument(f"not a whole number of bytes: {text!r}")
        value = int(float(number) * UNITS[unit]) if "." in number else int(number) * UNITS[unit]
    if not 0 < value < MAX_SIZE:
        raise InvalidArgument(f"memory size out of range: {text!r}")
    return value


def format_size(value: int) -> str:
    """``1610612736`` → ``1.5G``; ``536870912`` → ``512M``; small values in K or bytes."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(value) >= scale:
            text = f"{value / scale:.2f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{value}B"
