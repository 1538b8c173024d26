"""ReseedRandomDev and SetGuestDateTime in the agent: the ioctl argument layout, input bounds,
errors mapped to common.errors, and the RPCs wired in the service."""
from __future__ import annotations

import struct
import time

import pytest

from agent_api.agent import guest_identity
from common.errors import InvalidArgument, ResourceError


def test_entropy_request_is_rand_pool_info():
    req = guest_identity.entropy_request(b"abcde")
    count, size = struct.unpack("ii", req[:8])
    assert (count, size) == (40, 5) and req[8:] == b"abcde\0\0\0"


@pytest.mark.parametrize("n", [0, 15, 4097])
def test_reseed_bounds(n):
    with pytest.raises(InvalidArgument):
        guest_identity.reseed(b"x" * n)


def test_reseed_on_something_that_is_not_a_random_device(tmp_path):
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    with pytest.raises(ResourceError, match="reseeding"):
        guest_identity.reseed(b"x" * 512, device=str(dev))
    with pytest.raises(ResourceError, match="cannot open"):
        guest_identity.reseed(b"x" * 512, device=str(tmp_path / "missing"))


def test_set_time_sets_realtime_in_nanoseconds():
    calls = []
    guest_identity.set_time(1796186194, 421915, clock_settime=lambda clk, ns: calls.append((clk, ns)))
    assert calls == [(time.CLOCK_REALTIME, 1796186194_421915000)]


@pytest.mark.parametrize("sec, usec", [(0, 0), (10**12, 0), (1796186194, -1), (1796186194, 1_000_000)])
def test_set_time_rejects_nonsense(sec, usec):
    with pytest.raises(InvalidArgument):
        guest_identity.set_time(sec, usec, clock_settime=lambda *a: None)


def test_set_time_error_is_a_resource_error():
    def denied(clk, ns):
        raise PermissionError(1, "Operation not permitted")

    with pytest.raises(ResourceError, match="guest clock"):
        guest_identity.set_time(1796186194, 0, clock_settime=denied)


def test_service_serves_both_rpcs():
    from agent_api.agent.service import AgentService
    from proto.kata import agent_pb2

    names = {m.name for m in agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods}
    assert {"ReseedRandomDev", "SetGuestDateTime"} <= names
    assert agent_pb2.ReseedRandomDevRequest.DESCRIPTOR.fields_by_name["data"].number == 2
    f = agent_pb2.SetGuestDateTimeRequest.DESCRIPTOR.fields_by_name
    assert (f["Sec"].number, f["Usec"].number) == (1, 2)
    assert callable(AgentService.ReseedRandomDev) and callable(AgentService.SetGuestDateTime)
