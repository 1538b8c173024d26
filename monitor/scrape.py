"""Scrape every shim in parallel and merge their metrics into one exposition.

Each shim's ``/metrics`` is fetched over its management socket with :data:`TIMEOUT` (kata's 3 s);
a shim that fails or times out is skipped and counted, never failing the scrape. Every sample
gets ``sandbox_id``, ``cri_uid``, ``cri_name``, ``cri_namespace`` (kata-monitor's labels, in that
order); ``process_*``/``python_*`` families become ``kata_shim_process_*``/``kata_shim_python_*``;
families of the same name are merged across sandboxes (one HELP/TYPE) and sorted by name.

The shims' text is our own encoder's output (:mod:`common.prom_text`: HELP, TYPE, then the
family's samples) whose guest part each shim already validated, so it is relabelled line by line
instead of being parsed into objects — that keeps a scrape of several sandboxes in the tens of
milliseconds. A line that does not look like a sample is dropped and counted.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

from common.errors import KataColoError
from common.prom_text import escape_label_value
from shim.mgmt.client import ShimClient, socket_of

TIMEOUT = 3.0
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)([{ ])")
RENAMES = (("process_", "kata_shim_process_"), ("python_", "kata_shim_python_"))


def _rename(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _is_value(text: str) -> bool:
    """`` VALUE [TIMESTAMP]`` after a sample's name and labels."""
    parts = text.split()
    if not 1 <= len(parts) <= 2:
        return False
    try:
        float(parts[0])
        if len(parts) == 2:
            int(parts[1])
    except ValueError:
        return False
    return True


@dataclass
class MergedFamily:
    help: str = ""
    type: str = "untyped"
    samples: list[str] = field(default_factory=list)


@dataclass
class Merged:
    """Families by name, collected from many shims."""

    families: dict[str, MergedFamily] = field(default_factory=dict)
    bad_lines: int = 0

    def add(self, text: str, labels: str) -> int:
        """Relabel one shim's text with ``labels`` (``k="v",...``, no braces); returns samples added."""
        fam: MergedFamily | None = None
        fam_name = ""
        added = 0
        for line in text.splitlines():
            if not line:
                continue
            if line[0] == "#":
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    fam_name = _rename(parts[2])
                    fam = self.families.setdefault(fam_name, MergedFamily())
                    if parts[1] == "HELP":
                        fam.help = parts[3] if len(parts) > 3 else ""
                    else:
                        fam.type = parts[3] if len(parts) > 3 else "untyped"
                continue
            m = _SAMPLE.match(line)
            if m is None:
                self.bad_lines += 1
                continue
            name = _rename(m.group(1))
            rest = line[m.end():]
            if fam is None or not name.startswith(fam_name):
                fam_name = name
                fam = self.families.setdefault(name, MergedFamily())
            if m.group(2) == "{":
                close = rest.rfind("}")
                if close < 0 or not _is_value(rest[close + 1:]):
                    self.bad_lines += 1
                    continue
                sep = "" if rest.startswith("}") else ","
                fam.samples.append(f"{name}{{{labels}{sep}{rest}")
            else:
                if not _is_value(rest):
                    self.bad_lines += 1
                    continue
                fam.samples.append(f"{name}{{{labels}}} {rest}")
            added += 1
        return added

    def render(self, prefixes: tuple[str, ...] = ()) -> str:
        out: list[str] = []
        for name in sorted(self.families):
            if prefixes and not name.startswith(prefixes):
                continue
            fam = self.families[name]
            out.append(f"# HELP {name} {fam.help}\n# TYPE {name} {fam.type}\n")
            out.append("\n".join(fam.samples))
            out.append("\n")
        return "".join(out)


def label_text(sandbox_id: str, cri: tuple[str, str, str]) -> str:
    uid, name, namespace = (escape_label_value(v) for v in cri)
    return (f'sandbox_id="{escape_label_value(sandbox_id)}",cri_uid="{uid}",cri_name="{name}",'
            f'cri_namespace="{namespace}"')


class Scraper:
    """Keeps one HTTP client (keep-alive connection) per sandbox."""

    def __init__(self, root: str, timeout: float = TIMEOUT) -> None:
        self.root = root
        self.timeout = timeout
        self._clients: dict[str, ShimClient] = {}
        self.failures: dict[str, int] = {}

    def client(self, sandbox_id: str) -> ShimClient:
        c = self._clients.get(sandbox_id)
        if c is None:
            c = self._clients[sandbox_id] = ShimClient(socket_of(sandbox_id, self.root), timeout=self.timeout,
                                                       sandbox_id=sandbox_id)
        return c

    async def fetch(self, sandbox_id: str, path: str = "/metrics") -> str | KataColoError:
        try:
            return await self.client(sandbox_id).get_text(path)
        except KataColoError as exc:
            self.failures[sandbox_id] = self.failures.get(sandbox_id, 0) + 1
            await self.drop(sandbox_id)  # a fresh connection next time (the shim may have restarted)
            return exc

    async def scrape(self, ids: list[str]) -> dict[str, str | KataColoError]:
        started = time.monotonic()
        results = await asyncio.gather(*(self.fetch(i) for i in ids))
        self.last_duration = time.monotonic() - started
        return dict(zip(ids, results))

    async def drop(self, sandbox_id: str) -> None:
        c = self._clients.pop(sandbox_id, None)
        if c is not None:
            await c.close()

    async def close(self) -> None:
        for sid in list(self._clients):
            await self.drop(sid)
