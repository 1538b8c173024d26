"""The policy file (TOML) → validated tables, with errors located at file:line.

Layout::

    [daemon]            interval_ms, listen ("127.0.0.1:9301"; "" = no HTTP), cri_endpoint
    [tiers]             online = [...], offline = [...]  (default: the shim configuration's [colo])
    [cpu] ...           the CPU policy (resourced.policies.cpu)
    [memory] ...        the memory policy (resourced.policies.memory_config; [[memory.window]])
    [<other policy>]    each registered policy owns the table of its name

tomllib reports syntax errors with a line; a semantic error (a bad value) names a key path, and
:class:`Locator` finds that key's line in the text (the line of ``key =`` inside the table's
``[header]``, else the header's line). Unknown tables and keys are errors, so a typo stops the
daemon instead of silently running the defaults.
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resourced.errors import PolicyError

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")


@dataclass(frozen=True)
class Locator:
    file: str
    text: str

    def line_of(self, path: Sequence[str]) -> int | None:
        """1-based line of the key ``path`` (table names..., key), best effort. A table name
        ``name#N`` is the N-th ``[[name]]`` of an array of tables."""
        *tables, key = path if path else ("",)
        occurrence = 1
        if tables and "#" in tables[-1]:
            last, _, nth = tables[-1].partition("#")
            tables = [*tables[:-1], last]
            occurrence = int(nth) if nth.isdigit() else 1
        header = ".".join(tables)
        in_table = header == ""
        header_line: int | None = None
        whole = ".".join([*tables, key])
        seen = 0
        for n, raw in enumerate(self.text.splitlines(), 1):
            m = _HEADER.match(raw)
            if m:
                name = m.group(1).replace('"', "").replace(" ", "")
                if name == whole or name.startswith(whole + "."):
                    return n  # the key is itself a table
                in_table = name == header
                if in_table:
                    seen += 1
                    in_table = seen == occurrence
                    if in_table:
                        header_line = n
                continue
            if in_table and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", raw):
                return n
        return header_line

    def error(self, path: Sequence[str], reason: str) -> PolicyError:
        return PolicyError(self.file, self.line_of(path), f"{'.'.join(path)}: {reason}")


class Table:
    """Typed, checked access to one table; every read key is remembered so :meth:`done` can
    reject the unknown ones."""

    def __init__(self, data: Mapping[str, Any], path: tuple[str, ...], loc: Locator) -> None:
        if not isinstance(data, Mapping):
            raise loc.error(path, "must be a table")
        self.data, self.path, self.loc = data, path, loc
        self._seen: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        return self.data.get(key, default)

    def error(self, key: str, reason: str) -> PolicyError:
        return self.loc.error((*self.path, key), reason)

    def boolean(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, not {v!r}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise self.error(key, f"must be {'an integer' if integer else 'a number'}, not {v!r}")
        if not lo <= v <= hi:
            raise self.error(key, f"must be within {lo:g}..{hi:g}, not {v!r}")
        return v

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        v = self._get(key, default)
        if v not in choices:
            raise self.error(key, f"must be one of {list(choices)}, not {v!r}")
        return str(v)

    def string(self, key: str, default: str) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self.error(key, f"must be a string, not {v!r}")
        return v

    def strings(self, key: str, default: Sequence[str]) -> tuple[str, ...]:
        v = self._get(key, list(default))
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.error(key, f"must be a list of strings, not {v!r}")
        return tuple(v)

    def sub(self, key: str) -> Table:
        self._seen.add(key)
        return Table(self.data.get(key, {}), (*self.path, key), self.loc)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(unknown[0], f"unknown key (known: {sorted(self._seen)})")


def parse(text: str, file: str) -> tuple[dict[str, Any], Locator]:
    """TOML → (raw dict, locator). Syntax errors become PolicyError with their line."""
    loc = Locator(file, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise PolicyError(file, int(m.group(1)) if m else None, f"TOML syntax: {exc}") from None
    return data, loc
