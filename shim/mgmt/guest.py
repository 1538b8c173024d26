"""The guest's ``kata_agent_*``/``kata_guest_*`` metrics as the shim serves them: fetched with the
agent's GetMetrics, validated, re-rendered, cached.

The guest is untrusted. Its answer is capped (:data:`MAX_TEXT` bytes; ttrpc already refuses
frames over 4 MiB), parsed with prometheus_client's parser, and only families named
``kata_agent_*``/``kata_guest_*`` with at most :data:`MAX_SAMPLES` samples in all, label values of
at most :data:`MAX_LABEL` characters and finite-or-NaN values are kept; everything else is dropped
and counted in ``kata_colo_guest_metrics_errors{reason}``. Nothing raised by the guest reaches the
scrape: a failure leaves the previous snapshot in place (until :data:`MAX_AGE`).

Freshness: a snapshot younger than :data:`FRESH` is served as is; an older one (up to
:data:`MAX_AGE`) is served while a refresh runs in the background; beyond that the scrape waits
for the guest (at most :data:`TIMEOUT`). Under TCG one GetMetrics costs tens of milliseconds of
guest time, so back-to-back scrapes do not each pay it; ``kata_colo_guest_metrics_age_seconds``
says how old the served snapshot is. An agent answering NotFound/Unimplemented has no GetMetrics:
it is not asked again (as kata's shim does).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from common.errors import KataColoError, NotFound, Unimplemented
from common.prom_text import LABEL_RE, NAME_RE, Family, render

log = logging.getLogger(__name__)

PREFIXES = ("kata_agent_", "kata_guest_")
MAX_TEXT = 2 << 20
MAX_SAMPLES = 20000
MAX_LABEL = 256
MAX_LABELS = 8
FRESH = 2.0
MAX_AGE = 10.0
TIMEOUT = 2.5

Fetch = Callable[[], Awaitable[str]]


def sanitize(text: str, errors: Counter[str]) -> list[Family]:
    """Guest Prometheus text → the families we re-serve (bad parts dropped, counted in ``errors``)."""
    if len(text) > MAX_TEXT:
        errors["too_large"] += 1
        return []
    from prometheus_client.parser import text_string_to_metric_families  # only shims with a guest need it

    out: list[Family] = []
    samples = 0
    truncated = False
    try:
        for fam in text_string_to_metric_families(text):
            if samples >= MAX_SAMPLES:
                truncated = True
                break
            if not fam.name.startswith(PREFIXES) or not NAME_RE.fullmatch(fam.name):
                errors["foreign_family"] += 1
                continue
            kept = Family(fam.name, str(fam.documentation)[:MAX_LABEL], fam.type if fam.type in (
                "counter", "gauge", "histogram", "summary") else "untyped")
            for s in fam.samples:
                if samples >= MAX_SAMPLES:
                    truncated = True
                    break
                if not s.name.startswith(fam.name) or not NAME_RE.fullmatch(s.name):
                    errors["bad_sample"] += 1
                    continue
                labels = s.labels
                if len(labels) > MAX_LABELS or any(
                        not LABEL_RE.fullmatch(k) or len(v) > MAX_LABEL for k, v in labels.items()):
                    errors["bad_label"] += 1
                    continue
                value = float(s.value)
                if math.isinf(value) and s.name == fam.name:
                    errors["bad_value"] += 1
                    continue
                kept.add(value, tuple(labels.items()), s.name[len(fam.name):])
                samples += 1
            if kept.samples:
                out.append(kept)
    except Exception as exc:  # noqa: BLE001 - any parser failure on guest text is a counted error
        errors["parse"] += 1
        log.debug("guest metrics do not parse: %s", exc)
        return []
    if truncated:
        errors["too_many_samples"] += 1
    return out


class GuestMetrics:
    """One sandbox's guest metrics snapshot. ``fetch`` returns the agent's raw text (or raises)."""

    def __init__(self, fetch: Fetch, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._clock = clock
        self.text = ""
        self.fetched_at: float | None = None
        self.supported = True
        self.errors: Counter[str] = Counter()
        self._refresh: asyncio.Task[None] | None = None

    def age(self) -> float | None:
        return None if self.fetched_at is None else self._clock() - self.fetched_at

    async def get(self) -> str:
        """The text to serve now (may be "")."""
        if not self.supported:
            return ""
        age = self.age()
        if age is not None and age <= FRESH:
            return self.text
        if age is not None and age <= MAX_AGE:
            self._start_refresh()
            return self.text
        self._start_refresh()
        assert self._refresh is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._refresh), TIMEOUT + 0.5)
        age = self.age()
        return self.text if age is not None and age <= MAX_AGE else ""

    def _start_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self.refresh())

    async def refresh(self) -> None:
        try:
            raw = await asyncio.wait_for(self._fetch(), TIMEOUT)
        except (NotFound, Unimplemented):
            self.supported = False
            log.info("the agent has no GetMetrics: guest metrics disabled")
            return
        except (TimeoutError, KataColoError) as exc:
            self.errors["timeout" if isinstance(exc, TimeoutError) else "unavailable"] += 1
            return
        families = await asyncio.to_thread(sanitize, raw, self.errors)
        if families:
            self.text = await asyncio.to_thread(render, families)
            self.fetched_at = self._clock()

    def families(self) -> list[Family]:
        """The shim's own families about the guest metrics (errors, snapshot age)."""
        err = Family("kata_colo_guest_metrics_errors", "Guest metrics answers or parts dropped, by reason.",
                     "counter")
        for reason in ("timeout", "unavailable", "too_large", "parse", "foreign_family", "too_many_samples",
                       "bad_sample", "bad_label", "bad_value"):
            err.add(self.errors[reason], (("reason", reason),))
        fams = [err]
        age = self.age()
        if age is not None:
            fams.append(Family("kata_colo_guest_metrics_age_seconds",
                               "Age of the guest metrics snapshot served with this scrape.").add(age))
        return fams

    async def close(self) -> None:
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def agent_fetch(sandbox: Any) -> Fetch:
    """GetMetrics of ``sandbox``'s agent (FailedPrecondition while the VM is not running)."""
    async def fetch() -> str:
        text: str = await sandbox.require_agent().client.get_metrics()
        return text
    return fetch
