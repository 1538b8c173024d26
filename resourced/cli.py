"""``kata-colo-resourced [--policy FILE] [--kata-config FILE] [--dry-run] [--check]``.

``--policy`` defaults to /etc/kata-colo/resourced.toml (the built-in defaults when that file
does not exist); ``--kata-config`` is the shim configuration whose ``[colo]`` names the tiers
(resolved like the shim: $KATA_COLO_CONFIG, /etc/kata-colo/configuration.toml, packaged).
``--check`` validates both files and exits. Exit 2 on an invalid file (message: file:line:
reason), 0 after SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from common.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kata-colo-resourced", description="kata-colo node resource agent")
    ap.add_argument("--policy", default=None, help="policy TOML (default /etc/kata-colo/resourced.toml)")
    ap.add_argument("--kata-config", default=None, help="kata-colo configuration.toml ([colo] tiers)")
    ap.add_argument("--dry-run", action="store_true", help="decide and log, write nothing")
    ap.add_argument("--check", action="store_true", help="validate the files and exit")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    from resourced import daemon
    from shim import config as shimcfg

    try:
        colo = shimcfg.load(args.kata_config).colo
        cfg = daemon.load_file(args.policy, colo)
    except ConfigError as exc:
        print(f"kata-colo-resourced: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"kata-colo-resourced: {cfg.source}: ok ({', '.join(sorted(cfg.policies))})")
        return 0
    return asyncio.run(daemon.Daemon(cfg, dry_run=args.dry_run).run())
