"""kata-colo-monitor's HTTP endpoints (kata-monitor's set) and its own ``kata_monitor_*`` families.

``/metrics``: every shim's metrics with sandbox_id/cri_* labels plus the monitor's own families
(gzip when the client accepts it); ``/metrics?sandbox=<id>``: that shim's raw text (no labels
added); ``/metrics?filter_family=A,B``: only families starting with A or B (the monitor's own
left out). ``/sandboxes``: one id per line (HTML links when the client asks for text/html).
``/agent-url?sandbox=<id>``: the shim's ``/agent-url``. ``/``: an index.

Own families: ``kata_monitor_running_shim_count`` (gauge), ``kata_monitor_scrape_count`` and
``kata_monitor_scrape_failed_count`` (counters; failed = shim scrapes that failed and were
skipped), ``kata_monitor_scrape_durations_histogram_milliseconds`` (buckets 1..512 ms),
``kata_monitor_shim_scrape_failures{sandbox_id}``, ``kata_monitor_cri_lookups``/``_errors``,
``kata_monitor_bad_lines`` and the monitor process's own (kata_monitor_threads, _proc_status ...).
"""
from __future__ import annotations

import html
import time
from typing import Any

from aiohttp import web

from common.errors import InvalidArgument, KataColoError, NotFound
from common.ids import valid_id
from common.prom_text import CONTENT_TYPE, Family, gauge, render
from monitor.cri import CriLabels
from monitor.discovery import SandboxWatcher
from monitor.scrape import Merged, Scraper, label_text
from shim.mgmt import procfs
from shim.mgmt.client import ShimError
from shim.mgmt.metrics import Histogram

INDEX = """<html><head><title>kata-colo-monitor</title></head><body><h1>kata-colo-monitor</h1><ul>
<li><a href="/metrics">/metrics</a> every sandbox's metrics</li>
<li><a href="/sandboxes">/sandboxes</a> sandbox ids</li>
<li>/metrics?sandbox=&lt;id&gt;, /agent-url?sandbox=&lt;id&gt;, /metrics?filter_family=A,B</li>
</ul></body></html>"""


class Monitor:
    def __init__(self, root: str, runtime_endpoint: str) -> None:
        self.cri = CriLabels(runtime_endpoint)
        self.watcher = SandboxWatcher(root, self._changed)
        self.scraper = Scraper(root)
        self.scrape_count = 0
        self.failed_count = 0
        self.bad_lines = 0
        self.durations = Histogram("kata_monitor_scrape_durations_histogram_milliseconds",
                                   "Time used to scrape from shims")

    def _changed(self, added: set[str], removed: set[str]) -> None:
        for sid in removed:
            self.cri.forget(sid)
            self.scraper.failures.pop(sid, None)
        if added:
            self.cri.want(self.watcher.ids, soon=True)

    async def start(self) -> None:
        self.watcher.start()
        await self.watcher.ready.wait()

    async def close(self) -> None:
        await self.watcher.close()
        await self.cri.close()
        await self.scraper.close()

    # -- metrics -------------------------------------------------------------------------------
    def own_families(self) -> list[Family]:
        failures = Family("kata_monitor_shim_scrape_failures", "Failed scrapes per sandbox.", "counter")
        for sid, n in sorted(self.scraper.failures.items()):
            failures.add(n, (("sandbox_id", sid),))
        fams = [gauge("kata_monitor_running_shim_count", "Running shim count(running sandboxes).",
                      len(self.watcher.ids)),
                Family("kata_monitor_scrape_count", "Scape count.", "counter").add(self.scrape_count),
                Family("kata_monitor_scrape_failed_count", "Failed shim scrapes (skipped).",
                       "counter").add(self.failed_count),
                self.durations.family("action"),
                failures,
                Family("kata_monitor_cri_lookups", "CRI ListPodSandbox calls.", "counter").add(self.cri.lookups),
                Family("kata_monitor_cri_errors", "CRI ListPodSandbox failures.", "counter").add(self.cri.errors),
                Family("kata_monitor_bad_lines", "Shim lines that were not samples (dropped).",
                       "counter").add(self.bad_lines),
                *procfs.process_families("kata_monitor", "self")]
        return [f for f in fams if f.samples]

    async def aggregate(self, prefixes: tuple[str, ...] = ()) -> str:
        started = time.perf_counter()
        self.scrape_count += 1
        ids = sorted(self.watcher.ids)
        self.cri.want(set(ids))
        results = await self.scraper.scrape(ids)
        merged = Merged()
        for sid, text in results.items():
            if isinstance(text, KataColoError):
                self.failed_count += 1
                continue
            merged.add(text, label_text(sid, self.cri.labels(sid)))
        self.bad_lines += merged.bad_lines
        body = merged.render(prefixes)
        self.durations.observe("scrape", (time.perf_counter() - started) * 1e3)
        if not prefixes:
            body += render(self.own_families())
        return body

    # -- handlers ------------------------------------------------------------------------------
    def _sandbox_param(self, request: web.Request) -> str:
        sid = request.query.get("sandbox", "")
        if not sid or not valid_id(sid):
            raise InvalidArgument("missing or invalid ?sandbox=<id>")
        if sid not in self.watcher.ids:
            raise NotFound(f"no sandbox {sid}")
        return sid

    async def get_metrics(self, request: web.Request) -> web.StreamResponse:
        if "sandbox" in request.query:
            sid = self._sandbox_param(request)
            body = await self.scraper.client(sid).get_text("/metrics")
        else:
            filters = tuple(f for f in request.query.get("filter_family", "").split(",") if f)
            body = await self.aggregate(filters)
        resp = web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp.enable_compression()
        return resp

    async def get_sandboxes(self, request: web.Request) -> web.StreamResponse:
        ids = sorted(self.watcher.ids)
        if "text/html" in request.headers.get("Accept", ""):
            links = "".join(f'<li><a href="/metrics?sandbox={html.escape(i)}">{html.escape(i)}</a></li>'
                            for i in ids)
            return web.Response(text=f"<html><body><ul>{links}</ul></body></html>", content_type="text/html")
        return web.Response(text="".join(f"{i}\n" for i in ids))

    async def get_agent_url(self, request: web.Request) -> web.StreamResponse:
        sid = self._sandbox_param(request)
        return web.Response(text=await self.scraper.client(sid).get_text("/agent-url"))

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=INDEX, content_type="text/html")


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ShimError as exc:
        return web.Response(status=502 if exc.status >= 500 else exc.status, text=f"{exc.reason}\n")
    except KataColoError as exc:
        status = {InvalidArgument: 400, NotFound: 404}.get(type(exc), 503)
        return web.Response(status=status, text=f"{exc}\n")


def application(monitor: Monitor) -> web.Application:
    app = web.Application(middlewares=[errors])
    app.add_routes([web.get("/metrics", monitor.get_metrics), web.get("/sandboxes", monitor.get_sandboxes),
                    web.get("/agent-url", monitor.get_agent_url), web.get("/", monitor.index)])
    return app
