"""Text output of ``kata-colo-ctl`` (the ``--json`` forms print the shim's documents as they are)."""
from __future__ import annotations

from typing import Any

MIB = 1 << 20


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def memory(doc: dict[str, Any]) -> str:
    mem = doc.get("memory")
    if not mem:
        return "-"
    usable, boot = mem.get("usable_bytes", 0), mem.get("boot_bytes", 0)
    text = f"{usable // MIB}MiB" if usable == boot else f"{usable // MIB}/{boot // MIB}MiB"
    target = mem.get("target_bytes")
    if isinstance(target, int) and target and target != usable:
        text += f"→{target // MIB}"
    return text


def _mib(value: Any) -> str:
    return f"{int(value) // MIB} MiB" if isinstance(value, int) else "-"


def memory_detail(mem: dict[str, Any]) -> list[str]:
    """The lines of ``kata-colo-ctl mem <id>`` (and the memory part of ``status``)."""
    guest = mem.get("guest") or {}
    out = [f"Memory:     {_mib(mem.get('actual_bytes', mem.get('usable_bytes')))} "
           f"(target {_mib(mem.get('target_bytes'))}, floor {_mib(mem.get('floor_bytes'))}, "
           f"max {_mib(mem.get('max_bytes'))}; {', '.join(mem.get('mechanisms') or []) or 'no mechanism'})",
           f"  VM:       boot {_mib(mem.get('boot_bytes'))} + plugged {_mib(mem.get('plugged_bytes'))} "
           f"- ballooned {_mib(mem.get('ballooned_bytes'))}",
           f"  Guest:    available {_mib(guest.get('available_bytes'))}, used {_mib(guest.get('used_bytes'))} "
           f"({guest.get('source') or '-'})"]
    last = mem.get("last")
    if isinstance(last, dict):
        out.append(f"  Last:     {_mib(last.get('target_bytes'))} → {_mib(last.get('actual_bytes'))} in "
                   f"{last.get('seconds')}s{' (timed out)' if last.get('timed_out') else ''}: "
                   f"{'; '.join(last.get('steps') or []) or 'nothing to do'}")
    if mem.get("last_error"):
        out.append(f"  Error:    {mem['last_error']}")
    return out


def resized(doc: dict[str, Any]) -> str:
    """The answer of ``kata-colo-ctl mem <id> <size>``."""
    return (f"memory: {_mib(doc.get('actual_bytes'))} reached (target {_mib(doc.get('target_bytes'))}, "
            f"floor {_mib(doc.get('floor_bytes'))}, max {_mib(doc.get('max_bytes'))}) in {doc.get('seconds')}s"
            f"{': ' + '; '.join(doc['steps']) if doc.get('steps') else ''}")


def vcpus(doc: dict[str, Any]) -> str:
    rows = doc.get("vcpus") or []
    if not rows:
        return "-"
    by: dict[str, int] = {}
    for r in rows:
        key = r.get("priority") or "-"
        by[key] = by.get(key, 0) + 1
    return ",".join(f"{p}:{n}" for p, n in sorted(by.items()))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def listing(docs: dict[str, Any]) -> str:
    rows = []
    for sid, doc in docs.items():
        if isinstance(doc, Exception):
            rows.append([sid, "-", "-", "-", "-", "-", f"unreachable: {str(doc)[:60]}"])
            continue
        rows.append([sid, str(doc.get("vmm_pid") or "-"), vcpus(doc), memory(doc),
                     str(len(doc.get("containers") or [])), duration(doc.get("uptime_seconds")),
                     str(doc.get("state", "?"))])
    return table(rows, ["SANDBOX", "VMM PID", "VCPUS", "MEMORY", "CONTAINERS", "UPTIME", "STATE"])


def status(doc: dict[str, Any]) -> str:
    out = [f"Sandbox:    {doc.get('id')}",
           f"State:      {doc.get('state')}",
           f"Shim PID:   {doc.get('shim_pid')}",
           f"VMM PID:    {doc.get('vmm_pid') or '-'} ({doc.get('hypervisor') or '-'})",
           f"Agent:      {doc.get('agent_url') or '-'}",
           f"Uptime:     {duration(doc.get('uptime_seconds'))}"]
    mem = doc.get("memory")
    out += memory_detail(mem) if isinstance(mem, dict) and "target_bytes" in mem else [f"Memory:     {memory(doc)}"]
    containers = doc.get("containers") or []
    out.append(f"Containers: {len(containers)}")
    for c in containers:
        out.append(f"  {c['id']}  pid {c.get('pid')}  {c.get('status')}")
        out.extend(f"    exec {e['id']}  pid {e.get('pid')}  {e.get('status')}" for e in c.get("execs", []))
    rows = [[str(v["vcpu"]), v.get("priority") or "-", str(v.get("tid")), v.get("cgroup") or "-"]
            for v in doc.get("vcpus") or []]
    if rows:
        out.append("vCPUs:")
        out.extend("  " + line for line in table(rows, ["VCPU", "PRIORITY", "HOST TID", "CGROUP"]).splitlines())
    for name, p in sorted((doc.get("priorities") or {}).items()):
        knobs = " ".join(f"{k}={v}" for k, v in sorted((p.get("in_force") or {}).items()))
        out.append(f"Priority {name}: vCPUs {p.get('vcpus')} cpuset {p.get('cpuset') or '-'} {knobs}".rstrip())
    for n in doc.get("network") or []:
        out.append(f"Network:    {n.get('name')} {n.get('mac')} {' '.join(n.get('addresses') or [])} "
                   f"tap {n.get('tap') or '-'}")
    ov = doc.get("overhead")
    if ov and ov.get("cpu_percent") is not None:
        out.append(f"Overhead:   cpu {ov['cpu_percent']:.1f}%  memory {int(ov['memory_bytes'] or 0) // MIB}MiB "
                   f"({ov['source'].get('cpu')}; {ov['source'].get('memory')})")
    return "\n".join(out)
