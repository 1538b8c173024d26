"""ClhApi (the REST client) against the fake VMM process: answers, every error status, 429
retries, broken connections, deadlines, one request in flight, SCM_RIGHTS fds."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clh_testlib import FAKE_CLH, FakeVmm, schema_validator, tap_available

from common.errors import (
    AlreadyExists,
    ConnectionClosed,
    DeadlineExceeded,
    FailedPrecondition,
    HypervisorError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from hypervisor.clh import api as apimod
from hypervisor.clh.api import (
    RESIZE_RETRIES,
    ClhApi,
    ClhConflict,
    ClhNotFound,
    ClhServerError,
    ClhTooManyRequests,
    ClhWrongState,
    ch_message,
)

VM = {"cpus": {"boot_vcpus": 1, "max_vcpus": 2}, "memory": {"size": 256 << 20},
      "payload": {"kernel": "/boot/vmlinux"}}


@pytest.fixture
async def vmm(tmp_path: Path, fake_vmm: FakeVmm) -> AsyncIterator[tuple[ClhApi, subprocess.Popen[bytes]]]:
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen([FAKE_CLH, "--api-socket", f"path={sock}"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "fake VMM did not start"
            await asyncio.sleep(0.01)
        yield ClhApi(str(sock)), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


async def test_ping_and_info_answers_are_schema_valid(vmm, fake_vmm: FakeVmm):
    api, proc = vmm
    ping = await api.ping()
    assert ping["pid"] == proc.pid
    assert not list(schema_validator("VmmPingResponse").iter_errors(ping))
    await api.create(VM)
    info = await api.info()
    assert info["state"] == "Created" and info["config"] == VM
    assert not list(schema_validator("VmInfo").iter_errors(info))
    assert [e["method"] for e in fake_vmm.requests()] == ["GET", "PUT", "GET"]


@pytest.mark.parametrize("status, error, common", [
    (400, apimod.ClhBadRequest, InvalidArgument), (404, ClhNotFound, NotFound),
    (405, ClhWrongState, FailedPrecondition), (409, ClhConflict, AlreadyExists),
    (429, ClhTooManyRequests, ResourceExhausted), (500, ClhServerError, HypervisorError),
])
def test_status_maps_to_a_typed_error_with_chs_message(status, error, common):
    exc = apimod.status_error("vm.add-disk", status, "Reason", b'["Error from API","Identifier d0 is not unique"]')
    assert type(exc) is error and isinstance(exc, common) and exc.status == status
    assert str(exc) == (f"cloud-hypervisor vm.add-disk: HTTP {status} Reason: "
                        "Error from API: Identifier d0 is not unique")


def test_ch_message_forms():
    assert ch_message(b'["a","b"]') == "a: b"
    assert ch_message(b'"plain json"') == "plain json"
    assert ch_message(b"not json\n") == "not json"
    assert len(ch_message(b"x" * 100000)) == apimod.MESSAGE_LIMIT


async def test_real_error_paths(vmm, fake_vmm: FakeVmm, tmp_path: Path):
    api, _ = vmm
    with pytest.raises(ClhNotFound, match="HTTP 404.*The VM is not created"):
        await api.info()
    await api.create(VM)
    with pytest.raises(ClhWrongState, match="HTTP 405.*not booted"):
        await api.pause()
    disk = {"path": str(tmp_path / "api.sock"), "id": "d0"}
    assert await api.add_disk(disk) is None  # 204: cold-added before boot
    with pytest.raises(ClhConflict, match="HTTP 409.*d0 is not unique"):
        await api.add_disk(disk)
    with pytest.raises(ClhServerError, match="HTTP 500.*Failed to open disk"):
        await api.add_disk({"path": "/nonexistent", "id": "d1"})
    with pytest.raises(ClhServerError, match="already created"):
        await api.create(VM)


async def test_resize_429_is_retried_then_succeeds(vmm, fake_vmm: FakeVmm):
    api, _ = vmm
    await api.create(VM)
    await api.boot()
    fake_vmm.script({"vm.resize": [{"status": 429, "message": "cpu removal pending"}] * 2})
    await api.resize(desired_vcpus=2)
    assert fake_vmm.calls().count("vm.resize") == 3
    assert (await api.info())["config"]["cpus"]["boot_vcpus"] == 2


async def test_resize_429_gives_up_after_kata_s_retries(vmm, fake_vmm: FakeVmm):
    api, _ = vmm
    await api.create(VM)
    fake_vmm.script({"vm.resize": [{"status": 429, "message": "cpu removal pending"}] * (RESIZE_RETRIES + 1)})
    with pytest.raises(ClhTooManyRequests, match="cpu removal pending"):
        await api.resize(desired_vcpus=2)
    assert fake_vmm.calls().count("vm.resize") == RESIZE_RETRIES + 1
    with pytest.raises(InvalidArgument):
        await api.resize()


async def test_connection_dropped_mid_call(vmm, fake_vmm: FakeVmm):
    api, proc = vmm
    fake_vmm.script({"vm.create": ["drop"]})
    # EOF ("without answering") or, when the close races our read, ECONNRESET ("broke during")
    with pytest.raises(ConnectionClosed, match=r"(without answering|broke during) /api/v1/vm\.create"):
        await api.create(VM)
    assert proc.poll() is None
    await api.create(VM)  # the VMM is fine; the next call works
    fake_vmm.script({"vm.info": ["truncate"]})
    with pytest.raises(ConnectionClosed, match=r"(answer to|broke during) /api/v1/vm\.info"):
        await api.info()


async def test_vmm_dying_mid_call(vmm, fake_vmm: FakeVmm):
    api, proc = vmm
    fake_vmm.script({"vm.create": ["exit"]})
    with pytest.raises(ConnectionClosed):
        await api.create(VM)
    assert proc.wait(5) == 7
    with pytest.raises(ConnectionClosed, match="cannot connect"):
        await api.ping()


async def test_deadline(vmm, fake_vmm: FakeVmm):
    api, _ = vmm
    fake_vmm.script({"vmm.ping": [{"delay": 2}]})
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"vmm.ping did not answer within 0.2s"):
        await api.ping(timeout=0.2)
    assert time.monotonic() - t0 < 1.5
    assert apimod.TIMEOUTS["vm.add-disk"] == 5.0 and apimod.TIMEOUTS["vm.info"] == 1.0
    assert apimod.TIMEOUTS["vm.boot"] == 10.0 and apimod.TIMEOUTS["vmm.shutdown"] == 3.0


async def test_one_request_in_flight(vmm, fake_vmm: FakeVmm):
    api, _ = vmm
    await api.create(VM)
    fake_vmm.script({"vm.info": [{"delay": 0.05}] * 6})
    await asyncio.gather(*(api.info() for _ in range(6)))
    assert fake_vmm.violations() == []
    # control: two clients without a shared lock do overlap, and the fake sees it
    fake_vmm.script({"vm.info": [{"delay": 0.2}] * 2})
    other = ClhApi(api.socket_path)
    await asyncio.gather(api.info(), other.info())
    assert any("in flight" in v for v in fake_vmm.violations())
    fake_vmm.reset_journal()


async def test_add_net_sends_the_fds_as_scm_rights(vmm, fake_vmm: FakeVmm, queue_fds, tmp_path: Path):
    api, _ = vmm
    await api.create(VM | {"cpus": {"boot_vcpus": 2, "max_vcpus": 2}})
    fds = queue_fds("kcclhapi", 2)
    assert await api.add_net({"id": "n0", "mac": "02:00:00:00:00:09", "num_queues": 4}, fds) is None
    got = fake_vmm.last("vm.add-net")["fds"]
    assert [f["kind"] for f in got] == ["tap" if tap_available() else "pipe"] * 2
    with pytest.raises(apimod.ClhBadRequest, match="does not match the number of FDs"):
        await api.add_net({"id": "n1", "mac": "02:00:00:00:00:0a", "num_queues": 2}, fds)
    # control: an fd that is neither tap nor pipe is caught by the fake
    with open(tmp_path / "regular", "w") as f:
        await api.add_net({"id": "n2", "mac": "02:00:00:00:00:0b", "num_queues": 2}, [f.fileno()])
    assert any("neither taps nor pipes" in v for v in fake_vmm.violations())
    fake_vmm.reset_journal()
    for fd in fds:
        os.fstat(fd)  # the caller still owns its fds


async def test_oversized_answer_is_refused(vmm, fake_vmm: FakeVmm, monkeypatch):
    api, _ = vmm
    monkeypatch.setattr(apimod, "MAX_RESPONSE_BYTES", 64)
    with pytest.raises(HypervisorError, match="exceeds 64 bytes"):
        await api.ping()


async def test_unknown_endpoint_and_unreachable_socket(tmp_path: Path):
    api = ClhApi(str(tmp_path / "nothing.sock"))
    with pytest.raises(InvalidArgument, match="unknown cloud-hypervisor endpoint"):
        await api.call("vm.reboot")
    with pytest.raises(ConnectionClosed, match="cannot connect"):
        await api.ping()
