"""Kata's tcfilter network model for one pod netns.

For each CNI veth: a tap ``tap<N>_kata`` (one /dev/net/tun fd per queue, persistent) with the
veth's MTU, an ingress qdisc on veth and tap, and a u32 match-all filter with a mirred egress
redirect each way. The guest NIC gets the veth's MAC (QEMU ``-device virtio-net-pci,mac=``)
and the veth's IPs/routes via the agent (VethEndpoint.to_agent_*). detach() undoes exactly
what attach() recorded (TcFilterState), so CNI's veth, addresses and routes stay as they were.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceError,
)
from shim.resources.network.endpoint import VethEndpoint
from shim.resources.network.netns import netns_exists, run_in_netns, validate_netns_path
from shim.resources.network.state import STEPS, TcFilterState
from shim.resources.network.tap import MAX_QUEUES, check_ifname, tap_flags
from shim.resources.network.tc_common import TcBackend, ifindex
from shim.resources.network.tc_fast import FastBackend, load_speedups

BackendName = Literal["auto", "cython", "pyroute2"]


def make_backend(name: BackendName = "auto") -> TcBackend:
    if name == "pyroute2" or (name == "auto" and load_speedups() is None):
        from shim.resources.network.tc_pyroute2 import Pyroute2Backend  # a heavy import, when needed

        return Pyroute2Backend()
    if name in ("cython", "auto"):
        return FastBackend()
    raise InvalidArgument(f"unknown tc-filter backend {name!r}")


def tap_name_for(index: int) -> str:
    return f"tap{index}_kata"


@dataclass
class TapAttachment:
    """What the hypervisor needs for one guest NIC. The caller owns ``fds`` (send them to QEMU
    with SCM_RIGHTS, then close them here with close_fds())."""

    tap_name: str
    fds: list[int]
    guest_mac: str
    mtu: int
    queues: int
    vnet_hdr: bool
    state: TcFilterState = field(repr=False)

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


class TcFilterNetwork:
    """tc-filter attachments of one pod netns; JSON-persistable for cleanup after a crash.

    Blocking (a few ms) and not thread-safe: call from one task, via asyncio.to_thread in
    the shim's event loop."""

    def __init__(self, netns_path: str, backend: BackendName = "auto",
                 vnet_hdr: bool = True, on_change: Callable[[], None] | None = None) -> None:
        validate_netns_path(netns_path)
        self.netns_path = netns_path
        self.vnet_hdr = vnet_hdr
        self._backend_name: BackendName = backend
        self._backend: TcBackend | None = None
        self.attachments: list[TcFilterState] = []
        #: called after every change of :attr:`attachments` (the sandbox journals them)
        self.on_change = on_change or (lambda: None)

    @property
    def backend(self) -> TcBackend:
        if self._backend is None:
            self._backend = make_backend(self._backend_name)
        return self._backend

    def _next_tap_name(self) -> str:
        used = {a.tap_name for a in self.attachments}
        n = 0
        while tap_name_for(n) in used:
            n += 1
        return tap_name_for(n)

    def attach(self, endpoint: VethEndpoint, queues: int = 1) -> TapAttachment:
        """Wire *endpoint* to a new tap; NotFound if the veth is gone, AlreadyExists if the tap
        name is taken, ResourceError if the kernel refuses a step (then nothing is left)."""
        if not 1 <= queues <= MAX_QUEUES:
            raise InvalidArgument(f"queues must be 1..{MAX_QUEUES}, got {queues}")
        if any(a.veth_name == endpoint.name for a in self.attachments):
            raise AlreadyExists(f"{endpoint.name} is already attached")
        state = TcFilterState(netns=self.netns_path, veth_name=endpoint.name,
                              tap_name=self._next_tap_name(), queues=queues, mtu=endpoint.mtu,
                              guest_mac=endpoint.mac)
        check_ifname(state.tap_name)
        backend, flags = self.backend, tap_flags(queues, self.vnet_hdr)

        def here() -> list[int]:
            veth_index = ifindex(endpoint.name)
            if not veth_index:
                raise NotFound(f"{endpoint.name} not found in {self.netns_path}")
            if endpoint.ifindex and endpoint.ifindex != veth_index:
                raise FailedPrecondition(f"{endpoint.name} changed ifindex "
                                  f"({endpoint.ifindex} -> {veth_index}); rescan the netns")
            if ifindex(state.tap_name):
                raise AlreadyExists(f"{state.tap_name} already exists in {self.netns_path}")
            try:
                return backend.attach(state, veth_index, flags)
            except BaseException as exc:
                try:
                    backend.detach(state)
                except Exception as cleanup:  # keep the first error; detach() retries later
                    exc.add_note(f"rollback incomplete: {cleanup}")
                raise

        state.planned = True            # write-ahead: journaled before anything is made
        self.attachments.append(state)
        self.on_change()
        try:
            fds = run_in_netns(self.netns_path, here)
        except BaseException:
            state.planned = False       # the rollback ran; what it could not undo is marked
            if not state.created:
                self.attachments.remove(state)
            self.on_change()
            raise
        state.planned = False
        self.on_change()
        return TapAttachment(tap_name=state.tap_name, fds=fds, guest_mac=endpoint.mac,
                             mtu=endpoint.mtu, queues=queues, vnet_hdr=self.vnet_hdr,
                             state=state)

    def detach(self) -> None:
        """Remove every attachment's pieces (newest first). Idempotent; a vanished netns means
        the kernel already removed everything in it."""
        errors: list[str] = []
        for state in reversed(list(self.attachments)):
            try:
                detach_state(state, self.backend)
            except ResourceError as exc:
                errors.append(str(exc))
                continue
            self.attachments.remove(state)
            self.on_change()
        if errors:
            raise ResourceError("; ".join(errors))

    def to_json(self) -> str:
        return json.dumps({"netns": self.netns_path, "vnet_hdr": self.vnet_hdr,
                           "attachments": [a.to_dict() for a in self.attachments]},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, backend: BackendName = "auto") -> TcFilterNetwork:
        """Restore from to_json() output. Works when the netns is already gone (detach is then
        a no-op), so `delete` after a crash can always call detach()."""
        try:
            data = json.loads(text)
            netns, vnet_hdr, items = data["netns"], bool(data["vnet_hdr"]), data["attachments"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"bad tc-filter network json: {exc}") from None
        if not isinstance(netns, str) or not isinstance(items, list):
            raise InvalidArgument("bad tc-filter network json")
        net = cls.__new__(cls)
        net.netns_path, net.vnet_hdr = netns, vnet_hdr
        net._backend_name, net._backend = backend, None
        net.attachments = [TcFilterState.from_dict(item) for item in items]
        net.on_change = lambda: None
        return net


def detach_state(state: TcFilterState, backend: TcBackend) -> None:
    """Undo one attachment from its persisted state; no-op if the netns is gone. A ``planned``
    attachment (the shim died during attach) may have made any step: all are tried."""
    if state.planned:
        for step in STEPS:
            state.mark(step)
        state.planned = False
    if not state.created:
        return
    if not netns_exists(state.netns):
        state.created.clear()
        return
    try:
        run_in_netns(state.netns, lambda: backend.detach(state))
    except NotFound:
        state.created.clear()
