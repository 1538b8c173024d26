"""Persisted record of what one tc-filter attach created, so detach (also after a crash, from
the sandbox's resource journal) removes exactly that and nothing CNI made. An attach is journaled
*before* it starts (``planned``): a shim killed mid-attach leaves a record whose detach tries
every step, treating pieces that are not there as done."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from common.errors import InvalidArgument

STATE_VERSION = 1

# Steps in creation order; detach undoes them in reverse.
TAP = "tap"
QDISC_VETH = "qdisc_veth"
QDISC_TAP = "qdisc_tap"
FILTER_VETH = "filter_veth"   # veth ingress -> tap egress
FILTER_TAP = "filter_tap"     # tap ingress -> veth egress
STEPS = (TAP, QDISC_VETH, QDISC_TAP, FILTER_VETH, FILTER_TAP)


@dataclass
class TcFilterState:
    netns: str
    veth_name: str
    tap_name: str
    queues: int = 1
    mtu: int = 1500
    guest_mac: str = ""
    filter_prio: int = 1
    created: list[str] = field(default_factory=list)
    #: attach in progress (written ahead): any step may exist, detach tries them all
    planned: bool = False

    def mark(self, step: str) -> None:
        if step not in STEPS:
            raise InvalidArgument(f"unknown tc-filter step {step!r}")
        if step not in self.created:
            self.created.append(step)

    def unmark(self, step: str) -> None:
        if step in self.created:
            self.created.remove(step)

    def has(self, step: str) -> bool:
        return step in self.created

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TcFilterState:
        if not isinstance(data, dict):
            raise InvalidArgument("tc-filter state must be an object")
        if data.get("version") != STATE_VERSION:
            raise InvalidArgument(f"unsupported tc-filter state version {data.get('version')!r}")
        try:
            st = cls(netns=str(data["netns"]), veth_name=str(data["veth_name"]),
                     tap_name=str(data["tap_name"]), queues=int(data["queues"]),
                     mtu=int(data["mtu"]), guest_mac=str(data["guest_mac"]),
                     filter_prio=int(data["filter_prio"]), created=[],
                     planned=bool(data.get("planned", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad tc-filter state: {exc!r}") from None
        for step in data.get("created", []):
            st.mark(step)
        return st

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TcFilterState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"bad tc-filter state json: {exc}") from None
        return cls.from_dict(data)
