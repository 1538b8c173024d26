"""tc-filter backend over the Cython raw-netlink fast path (shim._speedups.netlink).

attach = tap ioctls + one send() of five requests + five acks; detach = one send().
"""
from __future__ import annotations

import os
import socket
import struct
from types import ModuleType

from common.errors import ResourceError
from shim.resources.network import state as st
from shim.resources.network.state import TcFilterState
from shim.resources.network.tc_common import GONE_ERRNOS, ifindex, next_seq

ACK_TIMEOUT_S = 5
NETLINK_ROUTE = 0

_ATTACH_STEPS = ("tap mtu/up", st.QDISC_VETH, st.QDISC_TAP, st.FILTER_VETH, st.FILTER_TAP)


def load_speedups() -> ModuleType | None:
    try:
        from shim._speedups import netlink  # type: ignore[attr-defined]  # Cython, no stub
    except ImportError:
        return None
    return netlink


def _rtnl_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", ACK_TIMEOUT_S, 0))
    return sock


class FastBackend:
    name = "cython"

    def __init__(self) -> None:
        mod = load_speedups()
        if mod is None:
            raise ResourceError("shim._speedups.netlink is not built "
                                "(python3 setup.py build_ext --inplace)")
        self._nl = mod

    def attach(self, state: TcFilterState, veth_index: int, tap_flags: int) -> list[int]:
        with _rtnl_socket() as sock:
            try:
                _tap_index, fds, errs = self._nl.attach_redirect(
                    sock.fileno(), veth_index, state.tap_name.encode(), state.queues, tap_flags,
                    state.mtu, state.filter_prio, next_seq(5))
            except OSError as exc:
                # the name was free before (checked by the caller): if it exists now it is ours
                # and persistent; deleting it also drops its qdisc and filter
                if ifindex(state.tap_name):
                    state.mark(st.TAP)
                raise ResourceError(f"tc-filter {state.veth_name}/{state.tap_name}: "
                                    f"{exc.strerror or exc}") from None
        state.mark(st.TAP)
        failed = ""
        for step, err in zip(_ATTACH_STEPS, errs):
            if err == 0:
                if step in st.STEPS:
                    state.mark(step)
            elif not failed:
                failed = f"{step}: {os.strerror(err)}"
        if failed:
            for fd in fds:
                os.close(fd)
            raise ResourceError(f"tc-filter {state.veth_name}/{state.tap_name}: {failed}")
        return list(fds)

    def detach(self, state: TcFilterState) -> None:
        nl = self._nl
        veth, tap = ifindex(state.veth_name), ifindex(state.tap_name)
        prio = state.filter_prio
        todo: list[tuple[str, int]] = [
            (step, index) for step, index in (
                (st.FILTER_VETH, veth), (st.FILTER_TAP, tap), (st.QDISC_VETH, veth),
                (st.QDISC_TAP, tap), (st.TAP, tap))
            if state.has(step)]
        sending = [(step, index) for step, index in todo if index]
        for step, index in todo:
            if not index:
                state.unmark(step)      # its link is gone, so is the piece
        if not sending:
            return
        seq = next_seq(len(sending))
        batch = bytearray()
        for i, (step, index) in enumerate(sending):
            if step in (st.FILTER_VETH, st.FILTER_TAP):
                batch += nl.build_filter_delete(seq + i, index, prio)
            elif step in (st.QDISC_VETH, st.QDISC_TAP):
                batch += nl.build_ingress_qdisc(seq + i, index, True)
            else:
                batch += nl.build_link_delete(seq + i, state.tap_name.encode())
        try:
            with _rtnl_socket() as sock:
                errs = nl.transact(sock.fileno(), bytes(batch), seq, len(sending))
        except OSError as exc:
            raise ResourceError(f"tc-filter detach {state.veth_name}/{state.tap_name}: "
                                f"{exc.strerror or exc}") from None
        failed = ""
        for (step, _index), err in zip(sending, errs):
            if err == 0 or err in GONE_ERRNOS:
                state.unmark(step)
            elif not failed:
                failed = f"{step}: {os.strerror(err)}"
        if failed:
            raise ResourceError(f"tc-filter detach {state.veth_name}/{state.tap_name}: {failed}")
