"""``python3 -m agent_api.agent``: the in-guest agent (also runs on a host for tests)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from agent_api.agent import agent_config as config
from agent_api.agent.server import Agent
from common.errors import ConfigError

log = logging.getLogger("agent_api.agent")


def _ensure_std_fds() -> None:
    """posix_spawn dup2's onto 0-2: they must exist so a new pipe never lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


async def _main(cfg: config.AgentConfig) -> None:
    agent = Agent(cfg)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("agent ready (state %s, runc %s, no_pivot=%s)", cfg.state_dir, cfg.runc, cfg.no_pivot)
    try:
        await stop.wait()
    finally:
        await agent.close()


def main(argv: list[str] | None = None) -> int:
    _ensure_std_fds()
    try:
        cfg = config.load(argv)
    except ConfigError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(_main(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
