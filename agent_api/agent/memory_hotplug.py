"""The guest onlines the memory the host hot-plugs, and reports its memory.

At start (:meth:`MemoryHotplug.configure`) the kernel is told to online new memory blocks by
itself — ``/sys/devices/system/memory/auto_online_blocks`` = ``online`` with the
``memory_hotplug.online_policy`` ``auto-movable`` (new blocks go to ZONE_MOVABLE while the
movable:kernel ratio allows, so virtio-mem can unplug them again), or ``online_movable`` on a
kernel without that policy. A uevent watcher (NETLINK_KOBJECT_UEVENT, kernel group) then onlines
any block that still arrives offline (a DIMM or a virtio-mem block added while auto-onlining was
off) and calls ``on_change`` after blocks came or went, so ``resources.json`` follows.
:func:`meminfo` is the guest's /proc/meminfo in bytes.
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from agent_api.agent.guest_details import read_value, write_value

log = logging.getLogger(__name__)

SYS_MEM = "/sys/devices/system/memory"
ONLINE_POLICY = "/sys/module/memory_hotplug/parameters/online_policy"
PROC_MEMINFO = "/proc/meminfo"
NETLINK_KOBJECT_UEVENT = 15
UEVENT_BUFFER = 1 << 16
SETTLE_SECONDS = 0.2
MEMINFO_KEYS = {"MemTotal": "total", "MemFree": "free", "MemAvailable": "available", "Cached": "cached"}


@dataclass(frozen=True)
class MemInfo:
    total: int = 0
    free: int = 0
    available: int = 0
    cached: int = 0


def meminfo(path: str = PROC_MEMINFO) -> MemInfo:
    """MemTotal/MemFree/MemAvailable/Cached in bytes (0 when a line is missing)."""
    values: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                name = MEMINFO_KEYS.get(key)
                parts = rest.split()
                if name and parts and parts[0].isdigit():
                    values[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return MemInfo(**values)


def block_size(sys_mem: str = SYS_MEM) -> int:
    text = read_value(os.path.join(sys_mem, "block_size_bytes"))
    try:
        return int(text, 16) if text else 0
    except ValueError:
        return 0


def offline_blocks(sys_mem: str = SYS_MEM) -> list[str]:
    """State files of the memory blocks that are offline."""
    return [p for p in glob.glob(os.path.join(sys_mem, "memory[0-9]*", "state")) if read_value(p) == "offline"]


def online_blocks(sys_mem: str = SYS_MEM) -> int:
    """Online every offline memory block (the kernel picks the zone by its online policy)."""
    return sum(1 for p in offline_blocks(sys_mem) if write_value(p, "online"))


def parse_uevent(data: bytes) -> dict[str, str]:
    """A kernel uevent (``action@devpath\\0KEY=VALUE\\0...``) → its keys."""
    fields = data.split(b"\0")
    out: dict[str, str] = {}
    for raw in fields[1:]:
        key, sep, value = raw.decode(errors="replace").partition("=")
        if sep:
            out[key] = value
    return out


class MemoryHotplug:
    """Auto-onlining and the uevent watcher (one per agent)."""

    def __init__(self, on_change: Callable[[], None] = lambda: None, *, sys_mem: str = SYS_MEM,
                 online_policy: str = ONLINE_POLICY) -> None:
        self.sys_mem = sys_mem
        self.online_policy = online_policy
        self.on_change = on_change
        self.mode = ""
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def configure(self) -> str:
        """Make the kernel online hot-added blocks itself; returns the mode set ("" = none)."""
        auto = os.path.join(self.sys_mem, "auto_online_blocks")
        if not os.path.exists(auto):
            return ""
        if write_value(self.online_policy, "auto-movable") and write_value(auto, "online"):
            self.mode = "online (auto-movable)"
        elif write_value(auto, "online_movable"):
            self.mode = "online_movable"
        else:
            log.warning("cannot enable auto-onlining of hot-plugged memory (%s)", auto)
            return ""
        log.info("hot-plugged memory is onlined by the kernel: %s", self.mode)
        return self.mode

    def start(self) -> None:
        """Start the uevent watcher (no-op where netlink uevents are unavailable)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
            sock.bind((0, 1))
            sock.setblocking(False)
        except (OSError, AttributeError) as exc:
            log.info("memory uevents unavailable: %s", exc)
            return
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._watch(sock), name="memory-uevents")

    async def _watch(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(sock, UEVENT_BUFFER)
            except OSError as exc:  # ENOBUFS after a burst: events were lost, rescan
                log.info("memory uevents: %s (rescanning)", exc)
                data = b""
            ev = parse_uevent(data) if data else {"SUBSYSTEM": "memory", "ACTION": "add"}
            if ev.get("SUBSYSTEM") != "memory":
                continue
            await asyncio.sleep(SETTLE_SECONDS)  # coalesce a burst (one block per 128 MiB)
            self._drain(sock)
            n = await asyncio.to_thread(online_blocks, self.sys_mem)
            if n:
                log.info("onlined %d hot-plugged memory block(s)", n)
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - the watcher must survive a listener bug
                log.exception("memory change listener failed")

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            while sock.recv(UEVENT_BUFFER):
                pass

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
