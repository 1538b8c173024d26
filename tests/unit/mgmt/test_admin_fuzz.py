"""Fuzz of the management socket: random methods, paths (known routes, mutations of them, junk),
headers and bodies (JSON of random shape, binary junk, truncated JSON, oversized), seeded so a
failure reproduces. Every answer must be one of the contract's codes with a JSON reason (never a
500, never a dropped connection), and the server (and a ttrpc Task API on the same event loop)
must keep serving throughout."""
from __future__ import annotations

import json
import os
import random

import aiohttp
import pytest
from google.protobuf import empty_pb2

from shim.mgmt import admin
from tests.unit.mgmt.test_admin_routes import call
from ttrpc import Client, Server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the peer check admits root only by default")

SEED = int(os.environ.get("KC_FUZZ_SEED", "1107"))
ROUNDS = int(os.environ.get("KC_FUZZ_ROUNDS", "600"))
METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"]
PATHS = ["/metrics", "/agent-url", "/colo/sandbox", "/colo/vcpus/0/priority", "/colo/vcpus/1/priority",
         "/colo/vcpus/99999/priority", "/colo/vcpus/x/priority", "/colo/priorities/low/knobs",
         "/colo/priorities/high/knobs", "/colo/priorities/../knobs", "/colo/priorities/%00/knobs", "/colo/exec",
         "/", "/colo", "/colo/vcpus", "/metrics/../colo/sandbox", "//colo//sandbox", "/colo/sandbox?x=1",
         "/colo/priorities/" + "a" * 300 + "/knobs"]
ALLOWED = {200, 400, 403, 404, 405, 409, 413, 501, 503}


def _value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randint(-2**40, 2**40)
    if kind == 1:
        return rng.choice([True, False, None])
    if kind == 2:
        return rng.random() * 1e6
    if kind == 3:
        return "".join(rng.choice("abc-_:01 \u00e9\x00") for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice(["high", "low", "batch", "", "0-1", "max"])
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["priority", "cpu_shares", "cpu_weight", "cpu_idle", "cfs_quota_us", "cfs_period_us", "cfs_burst_us",
            "cpuset", "pin", "argv", "stdin", "timeout", "env", "zzz"]
    return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _body(rng: random.Random) -> bytes | None:
    kind = rng.randrange(6)
    if kind == 0:
        return None
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 2:
        text = json.dumps(_value(rng))
        return text[: rng.randrange(len(text) + 1)].encode()
    if kind == 3 and rng.random() < 0.1:
        return b'{"priority": "' + b"x" * (admin.MAX_BODY + 10) + b'"}'
    return json.dumps(_value(rng)).encode()


class Echo:
    async def Check(self, req, ctx):  # noqa: N802 - ttrpc method name
        return empty_pb2.Empty()


async def test_fuzz_admin_routes(mgmt, tmp_path, monkeypatch):
    server, sandbox = mgmt
    monkeypatch.setattr(admin, "GUEST_TIMEOUT", 0.2)
    rng = random.Random(SEED)
    task_api = Server()
    task_api.register("fuzz.Echo", "Check", empty_pb2.Empty, Echo().Check)
    await task_api.start_unix(str(tmp_path / "task.sock"))
    ttrpc_client = await Client.connect_unix(str(tmp_path / "task.sock"), timeout=5)
    seen: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=server.path)) as s:
            for i in range(ROUNDS):
                sandbox.agent.client.hang = rng.random() < 0.05
                method, path, body = rng.choice(METHODS), rng.choice(PATHS), _body(rng)
                headers = {"Content-Type": rng.choice(["application/json", "text/plain", "x/y"])}
                async with s.request(method, f"http://shim{path}", data=body, headers=headers) as r:
                    raw = await r.read()
                    seen[r.status] = seen.get(r.status, 0) + 1
                    assert r.status in ALLOWED, (i, method, path, body[:200] if body else body, raw[:300])
                    if r.status >= 400 and method != "HEAD":
                        doc = json.loads(raw)
                        assert doc["status"] == r.status and doc["error"], (i, method, path, doc)
                if i % 50 == 0:
                    await ttrpc_client.call("fuzz.Echo", "Check", empty_pb2.Empty(), empty_pb2.Empty, timeout=2)
        sandbox.agent.client.hang = False
        status, doc = await call(server, "GET", "/colo/sandbox")
        assert status == 200 and doc["state"] == "running"
        await ttrpc_client.call("fuzz.Echo", "Check", empty_pb2.Empty(), empty_pb2.Empty, timeout=2)
    finally:
        await ttrpc_client.close()
        await task_api.close()
    assert {200, 400, 404, 405} <= set(seen), seen
