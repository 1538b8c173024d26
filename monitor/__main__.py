"""``kata-colo-monitor``: one per node; serves every kata-colo sandbox's metrics to Prometheus.

    kata-colo-monitor [--listen-address 127.0.0.1:8090] [--runtime-endpoint /run/containerd/containerd.sock]
                      [--state-root /run/kata-colo/sbs] [--log-level info]

Flags and defaults follow kata-monitor. Runs until SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from monitor.server import Monitor, application
from shim.persist import STATE_ROOT

DEFAULT_LISTEN = "127.0.0.1:8090"
DEFAULT_ENDPOINT = "/run/containerd/containerd.sock"
log = logging.getLogger("kata-colo-monitor")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen-address must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-colo-monitor", description=__doc__.splitlines()[0])
    p.add_argument("--listen-address", type=parse_listen, default=parse_listen(DEFAULT_LISTEN),
                   help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--runtime-endpoint", default=DEFAULT_ENDPOINT,
                   help=f"CRI endpoint for the cri_* labels (default {DEFAULT_ENDPOINT}; '' = none)")
    p.add_argument("--state-root", default=STATE_ROOT, help=f"sandbox state root (default {STATE_ROOT})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


async def run(args: argparse.Namespace, ready: asyncio.Event | None = None) -> None:
    monitor = Monitor(args.state_root, args.runtime_endpoint)
    await monitor.start()
    runner = web.AppRunner(application(monitor), handle_signals=False, access_log=None)
    await runner.setup()
    host, port = args.listen_address
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("serving on %s:%d, watching %s, CRI %s", host, port, args.state_root,
                 args.runtime_endpoint or "none")
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await runner.cleanup()
        await monitor.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(args))
    except OSError as exc:
        print(f"kata-colo-monitor: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
