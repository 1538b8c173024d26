"""The management socket's routes and every bad request of the contract, against a running
MgmtServer on a temporary Unix socket (real aiohttp server, real QoS model and manager over an
in-memory cgroup driver, a guest double)."""
from __future__ import annotations

import base64
import os
import stat

import aiohttp
import pytest

from shim.mgmt import admin
from shim.mgmt.client import ShimClient, ShimError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the peer check admits root only by default")


async def call(server, method: str, path: str, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=server.path)) as s:
        async with s.request(method, f"http://shim{path}", data=data, headers=headers or {}) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()


async def test_socket_is_private(mgmt):
    server, _ = mgmt
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600


async def test_sandbox_document(mgmt):
    server, sandbox = mgmt
    status, doc = await call(server, "GET", "/colo/sandbox")
    assert status == 200
    assert doc["id"] == sandbox.id and doc["state"] == "running" and doc["vmm_pid"] == os.getpid()
    assert {c["id"] for c in doc["containers"]} == {sandbox.id, "ctr-a"}
    assert [(v["vcpu"], v["priority"]) for v in doc["vcpus"]] == [(0, "high"), (1, "low")]
    assert doc["vcpus"][0]["cgroup"] == f"/kc-unit/{sandbox.id}/vcpu-high"
    assert doc["vcpus"][0]["tid"] == sandbox.hv.threads[0]
    assert doc["priorities"]["low"]["in_force"]["cpu_shares"] == 2
    assert doc["memory"]["usable_bytes"] == (512 - 64) << 20
    assert 40 <= doc["uptime_seconds"] < 600
    assert doc["agent_url"].startswith("unix:///")


async def test_agent_url_and_metrics(mgmt):
    server, _ = mgmt
    status, text = await call(server, "GET", "/agent-url")
    assert status == 200 and text == "unix:///run/kata-colo/sbs/x/vm/agent.sock"
    status, text = await call(server, "GET", "/metrics")
    assert status == 200
    assert 'kata_guest_meminfo{item="mem_total"} 536870912' in text
    assert "kata_shim_threads " in text and "kata_hypervisor_proc_status" in text
    assert 'kata_colo_vcpus{priority="high"} 1' in text


async def test_set_priority_moves_the_vcpu_and_tells_the_guest(mgmt):
    server, sandbox = mgmt
    status, doc = await call(server, "PUT", "/colo/vcpus/1/priority", b'{"priority": "high"}')
    assert status == 200, doc
    assert doc["mapping"] == {"high": [0, 1]}
    assert sandbox.agent.priorities[-1] == {"high": [0, 1]}
    _, doc = await call(server, "GET", "/colo/sandbox")
    assert [v["priority"] for v in doc["vcpus"]] == ["high", "high"]


async def test_knobs_change_in_force(mgmt):
    server, sandbox = mgmt
    status, doc = await call(server, "PUT", "/colo/priorities/low/knobs", b'{"cpu_shares": 64, "cpu_idle": true}')
    assert status == 200, doc
    assert doc["knobs"]["cpu_shares"] == 64
    group = f"kc-unit/{sandbox.id}/vcpu-low"
    assert sandbox.driver.read(group, "cpu.shares") == "64" and sandbox.driver.read(group, "cpu.idle") == "1"


@pytest.mark.parametrize(("method", "path", "body", "want", "reason"), [
    ("GET", "/nope", None, 404, "Not Found"),
    ("GET", "/colo/vcpus/0/priority", None, 405, "Method Not Allowed"),
    ("DELETE", "/metrics", None, 405, "Method Not Allowed"),
    ("PUT", "/colo/vcpus/0/priority", b"{not json", 400, "malformed JSON"),
    ("PUT", "/colo/vcpus/0/priority", b"[1]", 400, "JSON object"),
    ("PUT", "/colo/vcpus/0/priority", b'{"priority": "low", "x": 1}', 400, "unknown key(s) ['x']"),
    ("PUT", "/colo/vcpus/0/priority", b'{}', 400, "missing key(s) ['priority']"),
    ("PUT", "/colo/vcpus/0/priority", b'{"priority": "batch"}', 400, "unknown vCPU priority 'batch'"),
    ("PUT", "/colo/vcpus/7/priority", b'{"priority": "low"}', 400, "has no vCPU 7"),
    ("PUT", "/colo/vcpus/-1/priority", b'{"priority": "low"}', 400, "non-negative integer"),
    ("PUT", "/colo/priorities/low/knobs", b'{"cpu_shares": 1}', 400, "cpu_shares 1 not in 2..262144"),
    ("PUT", "/colo/priorities/low/knobs", b'{"cpu_sharez": 10}', 400, "unknown key(s) ['cpu_sharez']"),
    ("PUT", "/colo/priorities/low/knobs", b'{"cpu_idle": "yes"}', 400, "wrong type"),
    ("PUT", "/colo/priorities/nope/knobs", b'{"cpu_shares": 10}', 400, "unknown vCPU priority 'nope'"),
    ("PUT", "/colo/priorities/low/knobs", b'{}', 400, "no knobs given"),
    ("POST", "/colo/exec", b'{"argv": []}', 400, "non-empty list"),
    ("POST", "/colo/exec", b'{"argv": ["ls"], "timeout": 0}', 400, "1..300"),
    ("POST", "/colo/exec", b'{"argv": ["ls"], "stdin": "%%%"}', 400, "base64"),
])
async def test_bad_requests(mgmt, method, path, body, want, reason):
    server, _ = mgmt
    status, doc = await call(server, method, path, body)
    assert status == want, doc
    assert isinstance(doc, dict) and doc["status"] == want and reason in doc["error"], doc


async def test_body_over_one_mib_is_413(mgmt):
    server, _ = mgmt
    body = b'{"priority": "' + b"x" * (admin.MAX_BODY + 1) + b'"}'
    status, doc = await call(server, "PUT", "/colo/vcpus/0/priority", body)
    assert status == 413 and doc["status"] == 413


async def test_guest_not_answering_is_503_and_the_server_keeps_serving(mgmt, monkeypatch):
    server, sandbox = mgmt
    monkeypatch.setattr(admin, "GUEST_TIMEOUT", 0.3)
    sandbox.agent.client.hang = True
    status, doc = await call(server, "PUT", "/colo/vcpus/1/priority", b'{"priority": "high"}')
    assert status == 503 and "did not answer within" in doc["error"]
    status, doc = await call(server, "GET", "/colo/sandbox")
    assert status == 200


async def test_no_running_vm_is_409(mgmt):
    from shim.sandbox.sandbox import State

    server, sandbox = mgmt
    sandbox.state = State.STOPPED
    status, doc = await call(server, "PUT", "/colo/vcpus/0/priority", b'{"priority": "high"}')
    assert status == 409 and "not running" in doc["error"]
    status, _ = await call(server, "GET", "/metrics")
    assert status == 200


async def test_exec_runs_in_the_guest_and_unimplemented_guest_is_501(mgmt):
    server, sandbox = mgmt
    body = b'{"argv": ["cat"], "stdin": "' + base64.b64encode(b"hi") + b'", "timeout": 5}'
    status, doc = await call(server, "POST", "/colo/exec", body)
    assert status == 200 and doc["exit_code"] == 3
    assert base64.b64decode(doc["stdout"]) == b"out:hi" and base64.b64decode(doc["stderr"]) == b"err"
    assert sandbox.agent.client.exec_requests[-1] == (["cat"], b"hi", 5)
    status, doc = await call(server, "POST", "/colo/exec", b'{"argv": ["missing"]}')
    assert status == 501


async def test_exec_is_forbidden_unless_the_debug_console_is_enabled(mgmt):
    server, _ = mgmt
    server.admin.debug_console_enabled = False
    status, doc = await call(server, "POST", "/colo/exec", b'{"argv": ["ls"]}')
    assert status == 403 and "debug_console_enabled" in doc["error"]


async def test_client_maps_errors(mgmt):
    server, _ = mgmt
    async with ShimClient(server.path) as c:
        with pytest.raises(ShimError) as err:
            await c.json("PUT", "/colo/vcpus/0/priority", {"priority": "batch"})
        assert err.value.status == 400 and "batch" in err.value.reason
        doc = await c.json("GET", "/colo/sandbox")
        assert doc["state"] == "running"
