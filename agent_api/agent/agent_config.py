"""Agent options: kernel command line (``agent.*`` keys) overridden by CLI flags."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from common.errors import ConfigError
from common.guest_paths import AGENT_PORT_NAME as SERIAL_PORT_NAME
from common.guest_paths import AGENT_VSOCK_PORT as VSOCK_PORT
from common.guest_paths import GUEST_SHARED_DIR as SHARED_DIR
from common.guest_paths import SHARED_MOUNT_BASE

__all__ = ["SERIAL_PORT_NAME", "SHARED_DIR", "SHARED_MOUNT_BASE", "VSOCK_PORT", "AgentConfig", "load"]


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    log_level: str = "info"
    state_dir: str = "/run/kata-colo/agent"
    runc: str = "runc"
    no_pivot: bool = False
    shared_dir: str = SHARED_DIR
    cgroup_parent: str = "/kata-colo"
    listen: tuple[str, ...] = ()
    serial_name: str = SERIAL_PORT_NAME
    vsock_port: int = VSOCK_PORT
    use_serial: bool = True
    use_vsock: bool = True
    oom_poll_interval: float = 1.0


_TRUE = {"1", "true", "yes", "on", "y"}


def parse_cmdline(text: str) -> dict[str, str]:
    """``agent.log=debug agent.runc_no_pivot=1`` → {"log": "debug", "runc_no_pivot": "1"}."""
    out: dict[str, str] = {}
    for word in text.split():
        if not word.startswith("agent."):
            continue
        key, sep, value = word[len("agent."):].partition("=")
        out[key.replace("-", "_")] = value if sep else "1"
    return out


def from_cmdline(opts: dict[str, str], base: AgentConfig) -> AgentConfig:
    changes: dict[str, object] = {}
    if "log" in opts:
        changes["log_level"] = opts["log"]
    if "runc_no_pivot" in opts:
        changes["no_pivot"] = opts["runc_no_pivot"].lower() in _TRUE
    if "runc" in opts:
        changes["runc"] = opts["runc"]
    if "server_port" in opts:
        try:
            changes["vsock_port"] = int(opts["server_port"])
        except ValueError as exc:
            raise ConfigError(f"agent.server_port: {exc}") from None
    if "channel" in opts:
        changes["serial_name"] = opts["channel"]
    if "oom_poll_interval" in opts:
        changes["oom_poll_interval"] = float(opts["oom_poll_interval"])
    return dataclasses.replace(base, **changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m agent_api.agent", description=__doc__)
    p.add_argument("--listen", action="append", default=[],
                   help="extra listener, e.g. unix:/path (repeatable)")
    p.add_argument("--state-dir", help="bundles and runc state (default /run/kata-colo/agent)")
    p.add_argument("--runc", help="OCI runtime binary (default runc from PATH)")
    p.add_argument("--no-pivot", action="store_true", default=None,
                   help="run runc with --no-pivot (needed from an initramfs root)")
    p.add_argument("--shared-dir", help=f"container share dir (default {SHARED_DIR})")
    p.add_argument("--cgroup-parent", help="cgroup parent of containers (default /kata-colo)")
    p.add_argument("--log-level", help="debug|info|warning|error")
    p.add_argument("--cmdline", default="/proc/cmdline", help="kernel command line file")
    p.add_argument("--no-serial", action="store_true", help="do not serve virtio-serial")
    p.add_argument("--no-vsock", action="store_true", help="do not serve vsock")
    return p


def load(argv: list[str] | None = None) -> AgentConfig:
    args = build_parser().parse_args(argv)
    cfg = AgentConfig()
    try:
        cmdline = Path(args.cmdline).read_text()
    except OSError:
        cmdline = ""
    cfg = from_cmdline(parse_cmdline(cmdline), cfg)
    changes: dict[str, object] = {}
    for name in ("state_dir", "runc", "shared_dir", "cgroup_parent", "log_level"):
        value = getattr(args, name)
        if value:
            changes[name] = value
    if args.no_pivot:
        changes["no_pivot"] = True
    if args.listen:
        for addr in args.listen:
            if not addr.startswith("unix:"):
                raise ConfigError(f"--listen {addr!r}: only unix:/path is supported")
        changes["listen"] = tuple(args.listen)
    if args.no_serial:
        changes["use_serial"] = False
    if args.no_vsock:
        changes["use_vsock"] = False
    cfg = dataclasses.replace(cfg, **changes)
    if not cfg.cgroup_parent.startswith("/") or ".." in cfg.cgroup_parent.split("/"):
        raise ConfigError(f"cgroup parent {cfg.cgroup_parent!r} must be absolute")
    return cfg
