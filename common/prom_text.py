"""Prometheus text exposition (format 0.0.4) written with the exact family names given.

Host and guest neutral: the in-guest agent renders ``kata_agent_*``/``kata_guest_*`` with it (the
guest image ships no prometheus_client) and the shim and the monitor render theirs. Unlike
prometheus_client's ``generate_latest`` nothing is renamed: a counter called
``kata_monitor_scrape_count`` is written as ``kata_monitor_scrape_count``, the way kata's Go and
Rust components name theirs. Parsing is not done here (the host uses prometheus_client's parser).

A :class:`Family` is a name, help text, type and its samples; :func:`render` writes families in
the order given, each with ``# HELP`` and ``# TYPE`` and then its samples, values formatted the way
Go's client does (``+Inf``, ``NaN``, integers without a fraction).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: Go ExponentialBuckets(1, 2, 10): kata's RPC latency buckets in milliseconds.
EXP_BUCKETS_MS: tuple[float, ...] = tuple(float(2 ** i) for i in range(10))

Labels = tuple[tuple[str, str], ...]


def format_value(value: float) -> str:
    """A sample value the way Go's expfmt writes it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def label_block(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


@dataclass
class Family:
    """One metric family. Samples are (sample name suffix, labels, value); the suffix is appended
    to the family name ("" for counters and gauges, "_bucket"/"_sum"/"_count" for histograms)."""

    name: str
    help: str
    type: str = "gauge"
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.type not in TYPES:
            raise ValueError(f"invalid metric type {self.type!r}")

    def add(self, value: float, labels: Labels = (), suffix: str = "") -> Family:
        self.samples.append((suffix, labels, float(value)))
        return self


def gauge(name: str, help_: str, value: float | None = None) -> Family:
    fam = Family(name, help_, "gauge")
    if value is not None:
        fam.add(value)
    return fam


def labelled(name: str, help_: str, label: str, items: Iterable[tuple[str, float]],
             type_: str = "gauge", extra: Labels = ()) -> Family:
    """A family with one label (``item`` in kata's families), one sample per (value, number)."""
    fam = Family(name, help_, type_)
    for key, value in items:
        fam.add(value, (*extra, (label, key)))
    return fam


def histogram(name: str, help_: str, buckets: Sequence[float],
              series: Iterable[tuple[Labels, Sequence[int], float, int]]) -> Family:
    """``series``: (labels, cumulative counts per bucket upper bound, sum, count)."""
    fam = Family(name, help_, "histogram")
    for labels, counts, total, count in series:
        for bound, n in zip(buckets, counts):
            fam.add(n, (*labels, ("le", format_value(bound))), "_bucket")
        fam.add(count, (*labels, ("le", "+Inf")), "_bucket")
        fam.add(total, labels, "_sum")
        fam.add(count, labels, "_count")
    return fam


def render(families: Iterable[Family]) -> str:
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {escape_help(fam.help)}\n# TYPE {fam.name} {fam.type}\n")
        name = fam.name
        for suffix, labels, value in fam.samples:
            out.append(f"{name}{suffix}{label_block(labels)} {format_value(value)}\n")
    return "".join(out)
