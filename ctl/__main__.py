"""``kata-colo-ctl``: operate running kata-colo sandboxes through their management sockets.

    kata-colo-ctl list [--json]
    kata-colo-ctl status <id> [--json]
    kata-colo-ctl metrics <id> [--json]
    kata-colo-ctl set-priority <id> <vcpu> <priority>
    kata-colo-ctl knobs <id> <priority> key=value...
    kata-colo-ctl exec <id> [--timeout S] -- <cmd>...
    kata-colo-ctl mem <id> [<size>] [--json]
    kata-colo-ctl env [--json]

``<id>`` may be any unique prefix of a sandbox id (as kata-ctl). Exit status: 0 ok, 1 the
operation failed (unknown, ambiguous or dead sandbox, refused change — the message says which),
2 usage; ``exec`` exits with the command's status.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from typing import Any

from common.errors import KataColoError
from common.version import VERSION
from ctl import render
from shim.mgmt import client, sizes
from shim.persist import STATE_ROOT

MAX_STDIN = 1 << 20
EXEC_TIMEOUT = 30
MEM_TIMEOUT = 3600.0  # the shim bounds a resize itself ([colo.memory] resize_timeout)


def _value(text: str) -> Any:
    """A knob value from the command line: integers, true/false, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text, 10)
    except ValueError:
        return text


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"kata-colo-ctl: knobs: expected key=value, got {pair!r}")
        out[key] = _value(value)
    return out


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


async def _client(args: argparse.Namespace) -> client.ShimClient:
    sid = client.resolve(args.id, args.root)
    return client.ShimClient(client.socket_of(sid, args.root), timeout=args.timeout_s, sandbox_id=sid)


async def cmd_list(args: argparse.Namespace) -> int:
    ids = client.list_sandboxes(args.root)
    docs = await client.gather_json(ids, "/colo/sandbox", args.root, args.timeout_s)
    if args.json:
        _print_json({sid: ({"error": str(d)} if isinstance(d, Exception) else d) for sid, d in docs.items()})
    elif docs:
        print(render.listing(docs))
    else:
        print(f"no sandboxes under {args.root}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    async with await _client(args) as c:
        doc = await c.json("GET", "/colo/sandbox")
    if args.json:
        _print_json(doc)
    else:
        print(render.status(doc))
    return 0


async def cmd_metrics(args: argparse.Namespace) -> int:
    async with await _client(args) as c:
        text = await c.get_text("/metrics")
    if not args.json:
        sys.stdout.write(text)
        return 0
    from prometheus_client.parser import text_string_to_metric_families

    _print_json([{"name": f.name, "type": f.type, "help": f.documentation,
                  "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
                 for f in text_string_to_metric_families(text)])
    return 0


async def cmd_set_priority(args: argparse.Namespace) -> int:
    async with await _client(args) as c:
        doc = await c.json("PUT", f"/colo/vcpus/{args.vcpu}/priority", {"priority": args.priority},
                           timeout=max(args.timeout_s, 15.0))
    mapping = " ".join(f"{p}:{','.join(map(str, v))}" for p, v in sorted(doc["mapping"].items()))
    print(f"vCPU {doc['vcpu']} → {doc['priority']} (now {mapping})")
    return 0


async def cmd_knobs(args: argparse.Namespace) -> int:
    knobs = parse_knobs(args.knobs)
    async with await _client(args) as c:
        doc = await c.json("PUT", f"/colo/priorities/{args.priority}/knobs", knobs, timeout=max(args.timeout_s, 15.0))
    print(f"{doc['priority']}: " + " ".join(f"{k}={v}" for k, v in sorted(doc["knobs"].items())))
    return 0


async def cmd_exec(args: argparse.Namespace) -> int:
    argv = [a for a in args.cmd if a != "--"] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise SystemExit("kata-colo-ctl exec: no command given (kata-colo-ctl exec <id> -- <cmd>...)")
    stdin = b""
    if not sys.stdin.isatty():
        stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
        if len(stdin) > MAX_STDIN:
            raise SystemExit(f"kata-colo-ctl exec: stdin larger than {MAX_STDIN} bytes")
    body = {"argv": argv, "timeout": args.exec_timeout, "stdin": base64.b64encode(stdin).decode()}
    async with await _client(args) as c:
        doc = await c.json("POST", "/colo/exec", body, timeout=args.exec_timeout + 10.0)
    sys.stdout.buffer.write(base64.b64decode(doc["stdout"]))
    sys.stderr.buffer.write(base64.b64decode(doc["stderr"]))
    for stream in ("stdout", "stderr"):
        if doc.get(f"{stream}_truncated"):
            print(f"kata-colo-ctl: {stream} truncated at 1 MiB", file=sys.stderr)
    return int(doc["exit_code"])


async def cmd_mem(args: argparse.Namespace) -> int:
    """Without a size: the memory state (limits from the guest now). With one (``1536M``,
    ``1.5G``, bytes): resize and wait for the size reached."""
    async with await _client(args) as c:
        if args.size is None:
            doc = await c.json("GET", "/colo/memory?fresh=1", timeout=max(args.timeout_s, 10.0))
            text = "\n".join(render.memory_detail(doc))
        else:
            target = sizes.parse_size(args.size)
            try:
                doc = await c.json("PUT", "/colo/memory", {"target": target}, timeout=max(args.timeout_s, MEM_TIMEOUT))
            except client.ShimError as exc:
                if exc.status in (400, 503) and exc.body:
                    raise SystemExit(_mem_refusal(exc)) from None
                raise
            text = render.resized(doc)
    if args.json:
        _print_json(doc)
    else:
        print(text)
    return 0


def _mem_refusal(exc: client.ShimError) -> str:
    body = exc.body or {}
    limits = ", ".join(f"{k.removesuffix('_bytes')} {sizes.format_size(v)}" for k, v in sorted(body.items())
                       if k.endswith("_bytes") and isinstance(v, int))
    return f"kata-colo-ctl: mem: {exc.reason} (HTTP {exc.status}{'; ' + limits if limits else ''})"


async def cmd_env(args: argparse.Namespace) -> int:
    from shim import config

    env: dict[str, Any] = {"version": VERSION, "state_root": args.root,
                           "sandboxes": client.list_sandboxes(args.root)}
    try:
        path = config.resolve_path(None)
        cfg = config.load(None)
        hv = cfg.hypervisor
        env["config"] = {"path": str(path) if path else None, "hypervisor": cfg.runtime.hypervisor,
                         "hypervisor_path": hv.binary, "kernel": hv.kernel, "initrd": hv.initrd,
                         "default_vcpus": hv.default_vcpus, "default_memory_mib": hv.default_memory,
                         "agent_transport": cfg.agent.transport,
                         "debug_console_enabled": cfg.agent.debug_console_enabled,
                         "admin_gid": cfg.runtime.admin_gid, "colo_cgroup_root": cfg.colo.cgroup_root,
                         "priorities": sorted(cfg.colo.priorities)}
    except KataColoError as exc:
        env["config"] = {"error": str(exc)}
    env["env"] = {k: v for k, v in os.environ.items() if k.startswith("KATA_COLO_")}
    if args.json:
        _print_json(env)
        return 0
    print(f"kata-colo {VERSION}")
    print(f"state root: {args.root} ({len(env['sandboxes'])} sandbox(es))")
    for key, value in env["config"].items():
        print(f"config.{key}: {value}")
    for key, value in env["env"].items():
        print(f"env {key}={value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-colo-ctl", description="Operate running kata-colo sandboxes.")
    p.add_argument("--root", default=os.environ.get("KATA_COLO_STATE_ROOT", STATE_ROOT),
                   help=f"sandbox state root (default {STATE_ROOT})")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=client.DEFAULT_TIMEOUT,
                   help="seconds to wait for a shim (default 3)")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, fn: Any, help_: str, *, with_id: bool = True,
            json_flag: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        if with_id:
            sp.add_argument("id", help="sandbox id or a unique prefix of it")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    cmd("list", cmd_list, "every sandbox: VMM pid, vCPUs by priority, memory, containers, uptime",
        with_id=False, json_flag=True)
    cmd("status", cmd_status, "one sandbox in detail", json_flag=True)
    cmd("metrics", cmd_metrics, "the sandbox's Prometheus metrics", json_flag=True)
    sp = cmd("set-priority", cmd_set_priority, "move one vCPU to another priority, live")
    sp.add_argument("vcpu", type=int)
    sp.add_argument("priority")
    sp = cmd("knobs", cmd_knobs, "change a priority's knobs, live (cpu_shares=64 cpu_idle=true ...)")
    sp.add_argument("priority")
    sp.add_argument("knobs", nargs="+", metavar="key=value")
    sp = cmd("exec", cmd_exec, "run a command in the guest, outside any container (debug console)")
    sp.add_argument("--timeout", dest="exec_timeout", type=int, default=EXEC_TIMEOUT,
                    help="seconds before the command is killed (default 30, at most 300)")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sp = cmd("mem", cmd_mem, "show the VM's memory, or resize it live to <size> (1536M, 1.5G, bytes)",
             json_flag=True)
    sp.add_argument("size", nargs="?", help="the new size; omitted: show the memory state")
    cmd("env", cmd_env, "versions, configuration and paths", with_id=False, json_flag=True)
    sp = cmd("factory", cmd_factory, "VM templating: build the template, show it, or destroy it",
             with_id=False, json_flag=True)
    sp.add_argument("action", choices=("init", "status", "destroy"))
    sp.add_argument("--config", help="configuration file (default: $KATA_COLO_CONFIG, /etc/kata-colo/...)")
    return p


async def cmd_factory(args: argparse.Namespace) -> int:
    """``factory init|status|destroy`` (shim.factory.cli: the node's [factory] configuration)."""
    from shim.factory import cli as factory_cli

    return await factory_cli.run_async(args.action, args.config, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(asyncio.run(args.fn(args)))
    except client.ShimError as exc:
        print(f"kata-colo-ctl: {args.command}: {exc.reason} (HTTP {exc.status})", file=sys.stderr)
    except KataColoError as exc:
        print(f"kata-colo-ctl: {args.command}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
