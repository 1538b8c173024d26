"""``factory init|status|destroy`` (kata's ``kata-runtime factory``), for ``kata-colo-ctl``.

- ``init``: build the template for the node's configuration (the first sandbox would otherwise
  build it); prints ``vm factory initialized``. With ``vm_cache_number`` > 0 the cache itself
  is the ``kata-colo-vmcache`` daemon (a service): ``init`` says so.
- ``status``: ``vm factory is on|off|not enabled`` and what is there (template, clones still
  mapping it, the cache daemon's VMs); ``--json`` for machines.
- ``destroy``: ask a running cache daemon to quit (its cached VMs go), then remove the template
  and its tmpfs; running clones keep running. Prints ``vm factory destroyed``.

:func:`run_async` is what ``kata-colo-ctl`` awaits (:func:`run` for a caller without an event
loop); both return the exit code (0, 1 = failed, 2 = bad configuration) and write only to
``out``/``err``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from common.errors import KataColoError

ACTIONS = ("init", "status", "destroy")


async def _cache_status(cfg: Any) -> dict[str, Any] | None:
    from shim.factory.cache_client import CacheClient

    if cfg.factory.vm_cache_number <= 0:
        return None
    try:
        st = await CacheClient(cfg.factory.vm_cache_endpoint).status()
    except KataColoError as exc:
        return {"endpoint": cfg.factory.vm_cache_endpoint, "running": False, "error": exc.message}
    return {"endpoint": cfg.factory.vm_cache_endpoint, "running": True, "pid": st.pid, "key": st.key,
            "wanted": st.wanted, "handed_out": st.handed_out,
            "vms": [{"id": v.id, "pid": v.pid, "cpu": v.cpu, "memory_mib": v.memory, "state": v.state}
                    for v in st.vmstatus]}


async def init(cfg: Any) -> dict[str, Any]:
    from shim.factory.factory import node_vm_config, prepare_template
    from shim.factory.template import Template

    info = await Template(cfg.factory.template_path).build(
        node_vm_config(cfg), cfg.runtime.hypervisor, boot_timeout=cfg.hypervisor.boot_timeout, ready=prepare_template)
    return info.to_json()


async def status(cfg: Any) -> dict[str, Any]:
    from shim.factory.template import Template

    tmpl = await asyncio.to_thread(Template(cfg.factory.template_path).status)
    return {"enabled": cfg.factory.enable_template, "template": tmpl, "cache": await _cache_status(cfg)}


async def destroy(cfg: Any) -> dict[str, Any]:
    from shim.factory.cache_client import CacheClient
    from shim.factory.template import Template

    quit_cache = False
    if cfg.factory.vm_cache_number > 0:
        try:
            await CacheClient(cfg.factory.vm_cache_endpoint).quit()
            quit_cache = True
        except KataColoError:
            pass  # not running
    removed = await Template(cfg.factory.template_path).destroy()
    return {"cache_stopped": quit_cache, "template_removed": removed}


def _human(action: str, cfg: Any, result: dict[str, Any], out: TextIO) -> None:
    if action == "init":
        print("vm factory initialized", file=out)
        print(f"template {cfg.factory.template_path}: key {result['key']}, built in "
              f"{result['build_seconds']:.1f}s", file=out)
        if cfg.factory.vm_cache_number > 0:
            print(f"VM cache: start kata-colo-vmcache (keeps {cfg.factory.vm_cache_number} clones)", file=out)
        return
    if action == "destroy":
        print("vm factory destroyed", file=out)
        return
    tmpl = result["template"]
    state = "not enabled" if not result["enabled"] else ("on" if tmpl.get("template") else "off")
    print(f"vm factory is {state}", file=out)
    if tmpl.get("template"):
        t = tmpl["template"]
        print(f"template {tmpl['path']}: key {t['key']}, memory {t['memory_bytes'] >> 20} MiB, "
              f"state {t['state_bytes']} bytes", file=out)
    elif tmpl.get("unusable"):
        print(f"template {tmpl['path']} unusable: {tmpl['unusable']}", file=out)
    print(f"clones mapping the template: {len(tmpl['clones'])} {tmpl['clones']}", file=out)
    cache = result.get("cache")
    if cache and cache.get("running"):
        print(f"VM cache server pid = {cache['pid']}", file=out)
        for vm in cache["vms"]:
            print(f"VM pid = {vm['pid']} Cpu = {vm['cpu']} Memory = {vm['memory_mib']}MiB ({vm['state']})", file=out)
    elif cache:
        print(f"VM cache server not running at {cache['endpoint']}", file=out)


def run(action: str, config_path: str | None = None, *, as_json: bool = False,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    return asyncio.run(run_async(action, config_path, as_json=as_json, out=out, err=err))


async def run_async(action: str, config_path: str | None = None, *, as_json: bool = False,
                    out: TextIO | None = None, err: TextIO | None = None) -> int:
    from shim import config as cfgmod

    out = out or sys.stdout
    err = err or sys.stderr

    if action not in ACTIONS:
        print(f"factory: unknown action {action!r} (one of {', '.join(ACTIONS)})", file=err)
        return 2
    try:
        cfg = cfgmod.load(config_path)
    except KataColoError as exc:
        print(f"factory: {exc.message}", file=err)
        return 2
    if action == "init" and not cfg.factory.enable_template:
        print(f"factory: [factory] enable_template is off in {cfg.source}", file=err)
        return 2
    try:
        result = await {"init": init, "status": status, "destroy": destroy}[action](cfg)
    except KataColoError as exc:
        print(f"factory {action}: {exc.message}", file=err)
        return 1
    if as_json:
        print(json.dumps(result, sort_keys=True), file=out)
    else:
        _human(action, cfg, result, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kata-colo-ctl factory", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=ACTIONS)
    ap.add_argument("--config", help="configuration file (default: $KATA_COLO_CONFIG, /etc/kata-colo/...)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run(args.action, args.config, as_json=args.json)
