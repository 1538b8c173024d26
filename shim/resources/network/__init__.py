"""Pod networking, Kata's tcfilter model: scan the CNI netns for veth endpoints, wire each to a
tap with ingress-qdisc + mirred redirects, hand the tap fds and MAC to the hypervisor."""
from shim.resources.network.endpoint import IPAddr, Neighbor, Route, VethEndpoint
from shim.resources.network.scan import scan_netns
from shim.resources.network.state import TcFilterState
from shim.resources.network.tcfilter import TapAttachment, TcFilterNetwork, detach_state

__all__ = [
    "IPAddr",
    "Neighbor",
    "Route",
    "TapAttachment",
    "TcFilterNetwork",
    "TcFilterState",
    "VethEndpoint",
    "detach_state",
    "scan_netns",
]
