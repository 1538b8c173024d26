"""A tiny crictl: ``python -m cri --address SOCK COMMAND ...`` (used by `make demo` and for debugging).

    version
    runp NAME [-n NS] [--uid UID] [-r HANDLER] [--log-dir DIR] [-l K=V]... [-a K=V]...   → pod id
    create POD NAME IMAGE [--log-path P] [-e K=V]... [-m HOST:CTR[:ro]]... [-w DIR] [--args A]... [--] [CMD...]
    start|stop|rm CID          stopp|rmp POD...         exec [-t SECS] CID CMD...
    inspectp POD [-v]          inspect CID [-v]          pods [-q]      ps [-p POD] [-a] [-q]
    images                     inspecti IMAGE            pull IMAGE
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from common.errors import KataColoError
from cri.client import CriClient, to_dict
from proto.cri.runtime.v1 import api_pb2 as api

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def _kv(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _mounts(items: Sequence[str] | None) -> list[tuple[str, str, bool]]:
    out = []
    for item in items or ():
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise SystemExit(f"expected HOST:CONTAINER[:ro|rw], got {item!r}")
        out.append((parts[0], parts[1], len(parts) == 3 and parts[2] == "ro"))
    return out


def _age(ns: int) -> str:
    secs = max(0, int(time.time() - ns / 1e9))
    return f"{secs}s" if secs < 120 else f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cri", description="a tiny crictl for kata-colo")
    p.add_argument("--address", "-A", default=DEFAULT_ADDRESS, help="CRI socket (path or unix://path)")
    p.add_argument("--rpc-timeout", type=float, default=120.0, help="per-RPC deadline in seconds")
    sub = p.add_subparsers(dest="op", required=True)
    sub.add_parser("version")
    r = sub.add_parser("runp", help="run a pod sandbox")
    r.add_argument("name")
    r.add_argument("-n", "--namespace", default="default")
    r.add_argument("--uid", default="")
    r.add_argument("-r", "--runtime", default="", help="runtime handler, e.g. kata-colo")
    r.add_argument("--log-dir", default="")
    r.add_argument("--hostname", default="")
    r.add_argument("-l", "--label", action="append")
    r.add_argument("-a", "--annotation", action="append")
    c = sub.add_parser("create", help="create a container in a pod")
    c.add_argument("pod")
    c.add_argument("name")
    c.add_argument("image")
    c.add_argument("command", nargs="*", help="entrypoint override (after --, if it has options)")
    c.add_argument("--args", action="append", default=[], help="an argument (repeatable)")
    c.add_argument("--log-path", default="")
    c.add_argument("-e", "--env", action="append")
    c.add_argument("-m", "--mount", action="append")
    c.add_argument("-w", "--workdir", default="")
    c.add_argument("-l", "--label", action="append")
    c.add_argument("-a", "--annotation", action="append")
    c.add_argument("-t", "--tty", action="store_true")
    for name in ("start", "rm"):
        sub.add_parser(name).add_argument("container")
    s = sub.add_parser("stop")
    s.add_argument("container")
    s.add_argument("-t", "--timeout", type=int, default=0, help="grace period in seconds")
    for name in ("stopp", "rmp"):
        sub.add_parser(name).add_argument("pods", nargs="+")
    e = sub.add_parser("exec", help="ExecSync: run a command and wait")
    e.add_argument("-t", "--timeout", type=int, default=0)
    e.add_argument("container")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    for name, arg in (("inspectp", "pod"), ("inspect", "container")):
        i = sub.add_parser(name)
        i.add_argument(arg)
        i.add_argument("-v", "--verbose", action="store_true")
    sub.add_parser("pods").add_argument("-q", "--quiet", action="store_true")
    ps = sub.add_parser("ps")
    ps.add_argument("-p", "--pod", default="")
    ps.add_argument("-a", "--all", action="store_true")
    ps.add_argument("-q", "--quiet", action="store_true")
    sub.add_parser("images")
    sub.add_parser("inspecti").add_argument("image")
    sub.add_parser("pull").add_argument("image")
    return p


async def run(args: argparse.Namespace) -> int:
    async with CriClient(args.address, timeout=args.rpc_timeout) as c:
        cmd = args.op
        if cmd == "version":
            _print_json(to_dict(await c.version()))
        elif cmd == "runp":
            print(await c.run_pod_sandbox(args.name, namespace=args.namespace, uid=args.uid,
                                          runtime_handler=args.runtime, log_directory=args.log_dir,
                                          hostname=args.hostname, labels=_kv(args.label),
                                          annotations=_kv(args.annotation)))
        elif cmd == "create":
            print(await c.create_container(args.pod, args.name, args.image, command=args.command, args=args.args,
                                           log_path=args.log_path, env=_kv(args.env),
                                           mounts=_mounts(args.mount), working_dir=args.workdir,
                                           labels=_kv(args.label), annotations=_kv(args.annotation),
                                           tty=args.tty))
        elif cmd == "start":
            await c.start_container(args.container)
        elif cmd == "stop":
            await c.stop_container(args.container, args.timeout)
        elif cmd == "rm":
            await c.remove_container(args.container)
        elif cmd == "stopp":
            for pod in args.pods:
                await c.stop_pod_sandbox(pod)
                print(f"stopped pod {pod}")
        elif cmd == "rmp":
            for pod in args.pods:
                await c.remove_pod_sandbox(pod)
                print(f"removed pod {pod}")
        elif cmd == "exec":
            if not args.argv:
                raise SystemExit("exec: no command")
            rc, out, err = await c.exec_sync(args.container, args.argv, args.timeout)
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
            sys.stderr.buffer.write(err)
            return rc
        elif cmd == "inspectp":
            _print_json(_with_info(to_dict(await c.pod_sandbox_status(args.pod, verbose=args.verbose))))
        elif cmd == "inspect":
            _print_json(_with_info(to_dict(await c.container_status(args.container, verbose=args.verbose))))
        elif cmd == "pods":
            pods = await c.list_pod_sandbox()
            if args.quiet:
                print("\n".join(p.id for p in pods))
            else:
                rows = [["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"]]
                rows += [[p.id[:13], _age(p.created_at),
                          api.PodSandboxState.Name(p.state).removeprefix("SANDBOX_"), p.metadata.name,
                          p.metadata.namespace, str(p.metadata.attempt), p.runtime_handler or "(default)"]
                         for p in pods]
                print(_table(rows))
        elif cmd == "ps":
            state = None if args.all else api.CONTAINER_RUNNING
            ctrs = await c.list_containers(pod_id=args.pod, state=state)
            if args.quiet:
                print("\n".join(x.id for x in ctrs))
            else:
                rows = [["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID"]]
                rows += [[x.id[:13], x.image.image, _age(x.created_at),
                          api.ContainerState.Name(x.state).removeprefix("CONTAINER_"), x.metadata.name,
                          str(x.metadata.attempt), x.pod_sandbox_id[:13]] for x in ctrs]
                print(_table(rows))
        elif cmd == "images":
            rows = [["IMAGE ID", "TAGS", "SIZE"]]
            rows += [[i.id.removeprefix("sha256:")[:13], ",".join(i.repo_tags) or "<none>", str(i.size)]
                     for i in await c.list_images()]
            print(_table(rows))
        elif cmd == "inspecti":
            img = await c.image_status(args.image)
            if img is None:
                print(f"image {args.image} not found", file=sys.stderr)
                return 1
            _print_json(to_dict(img))
        elif cmd == "pull":
            print(await c.pull_image(args.image))
    return 0


def _with_info(d: dict[str, object]) -> dict[str, object]:
    """Expand the JSON strings of a verbose ``info`` map."""
    info = d.get("info")
    if isinstance(info, dict):
        for k, v in info.items():
            try:
                info[k] = json.loads(v)
            except (TypeError, ValueError):
                pass
    return d


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:  # everything after the first -- is the container/exec command, verbatim
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    if args.op == "create":
        args.command = [*args.command, *tail]
    elif args.op == "exec":
        args.argv = [*args.argv, *tail]
    elif tail:
        raise SystemExit(f"{args.op}: unexpected arguments after --")
    try:
        return asyncio.run(run(args))
    except KataColoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
