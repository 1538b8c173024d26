"""tc-filter backend over pyroute2 (the general path and the benchmark baseline)."""
from __future__ import annotations

import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from common.errors import ResourceError
from shim.resources.network import state as st
from shim.resources.network.state import TcFilterState
from shim.resources.network.tap import IFF_VNET_HDR, open_tap_queues
from shim.resources.network.tc_common import (
    ETH_P_ALL,
    GONE_ERRNOS,
    INGRESS_HANDLE,
    U32_CLASSID,
    ifindex,
)


def _redirect(ipr: IPRoute, src: int, dst: int, prio: int) -> None:
    ipr.tc("add-filter", "u32", src, parent=INGRESS_HANDLE, protocol=ETH_P_ALL, prio=prio,
           target=U32_CLASSID, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": dst})


def _del_filter(ipr: IPRoute, index: int, prio: int) -> None:
    # no kind: pyroute2's u32 argument processor insists on add-time fields
    ipr.tc("del-filter", index=index, parent=INGRESS_HANDLE, protocol=ETH_P_ALL, prio=prio)


class Pyroute2Backend:
    name = "pyroute2"

    def attach(self, state: TcFilterState, veth_index: int, tap_flags: int) -> list[int]:
        fds = open_tap_queues(state.tap_name, state.queues, bool(tap_flags & IFF_VNET_HDR))
        state.mark(st.TAP)
        step = "tap setup"
        try:
            with IPRoute(groups=0) as ipr:
                tap_index = ifindex(state.tap_name)
                ipr.link("set", index=tap_index, mtu=state.mtu, state="up")
                step = "ingress qdisc on veth"
                ipr.tc("add", "ingress", veth_index, INGRESS_HANDLE)
                state.mark(st.QDISC_VETH)
                step = "ingress qdisc on tap"
                ipr.tc("add", "ingress", tap_index, INGRESS_HANDLE)
                state.mark(st.QDISC_TAP)
                step = "redirect veth->tap"
                _redirect(ipr, veth_index, tap_index, state.filter_prio)
                state.mark(st.FILTER_VETH)
                step = "redirect tap->veth"
                _redirect(ipr, tap_index, veth_index, state.filter_prio)
                state.mark(st.FILTER_TAP)
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            if not isinstance(exc, (NetlinkError, OSError)):
                raise
            code = getattr(exc, "code", None) or getattr(exc, "errno", None)
            raise ResourceError(f"tc-filter {state.veth_name}/{state.tap_name}: {step}: "
                                f"{os.strerror(code) if code else exc}") from None
        return fds

    def detach(self, state: TcFilterState) -> None:
        veth, tap = ifindex(state.veth_name), ifindex(state.tap_name)
        ipr: IPRoute
        plan = [
            (st.FILTER_VETH, veth, lambda i: _del_filter(ipr, i, state.filter_prio)),
            (st.FILTER_TAP, tap, lambda i: _del_filter(ipr, i, state.filter_prio)),
            (st.QDISC_VETH, veth, lambda i: ipr.tc("del", "ingress", i, INGRESS_HANDLE)),
            (st.QDISC_TAP, tap, lambda i: ipr.tc("del", "ingress", i, INGRESS_HANDLE)),
            (st.TAP, tap, lambda i: ipr.link("del", index=i)),
        ]
        try:
            ipr = IPRoute(groups=0)
        except OSError as exc:
            raise ResourceError(f"tc-filter detach: netlink socket: {exc}") from None
        with ipr:
            for step, index, undo in plan:
                if not state.has(step):
                    continue
                if index:
                    try:
                        undo(index)
                    except NetlinkError as exc:
                        if exc.code not in GONE_ERRNOS:
                            raise ResourceError(f"tc-filter detach {step}: "
                                                f"{os.strerror(exc.code)}") from None
                state.unmark(step)
