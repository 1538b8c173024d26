"""Interop with the real Go containerd 1.6: our ttrpc client publishes to it, and containerd
execs our shim binary (with the TEST host backend, see tests/fakes/)."""
from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime

import pytest
from google.protobuf import any_pb2, empty_pb2

from proto.containerd.events import task_pb2 as events_pb2
from proto.containerd.services.events import ttrpc_pb2
from shim.convert import datetime_to_ts
from tests.support.containerd import IMAGE, RUNTIME, shim_processes
from ttrpc import Client

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]


def test_our_ttrpc_client_publishes_an_event_containerd_accepts(fake_containerd):
    c = fake_containerd
    events = subprocess.Popen(["ctr", "-a", c.address, "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        async def publish():
            client = await Client.connect_unix(c.ttrpc_address, timeout=5)
            req = ttrpc_pb2.ForwardRequest()
            env = req.envelope
            datetime_to_ts(datetime.now(UTC), env.timestamp)
            env.namespace = "default"
            env.topic = "/tasks/oom"
            ev = events_pb2.TaskOOM(container_id="kc-interop-probe")
            env.event.CopyFrom(any_pb2.Any(type_url="containerd.events.TaskOOM", value=ev.SerializeToString()))
            await client.call("containerd.services.events.ttrpc.v1.Events", "Forward", req, empty_pb2.Empty,
                              timeout=5)
            await client.close()

        # `ctr events` subscribes asynchronously: publish until the subscriber has seen one
        # (each publish is a complete Forward round trip that containerd acknowledged).
        import os
        os.set_blocking(events.stdout.fileno(), False)
        deadline = time.monotonic() + 20
        seen = ""
        while time.monotonic() < deadline and "kc-interop-probe" not in seen:
            asyncio.run(publish())
            for _ in range(10):
                seen += (events.stdout.read() or b"").decode(errors="replace")
                if "kc-interop-probe" in seen:
                    break
                time.sleep(0.1)
        assert "/tasks/oom" in seen and "kc-interop-probe" in seen, seen
    finally:
        events.kill()
        events.wait()


def test_ctr_run_through_our_shim_binary(fake_containerd):
    c = fake_containerd
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "kc-echo", "echo", "hello from the shim")
    assert res.stdout.decode().strip() == "hello from the shim"
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "kc-exit", "sh", "-c", "exit 7", check=False)
    assert res.returncode == 7, res
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "kc-stdin", "head", "-n", "1", input=b"hi\nthere\n")
    assert res.stdout.decode().strip() == "hi"
    for _ in range(50):
        if not shim_processes(c.address):
            break
        time.sleep(0.1)
    assert shim_processes(str(c.dir)) == []


def test_detached_task_kill_ls_and_cleanup(fake_containerd):
    c = fake_containerd
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "kc-long", "sleep", "300")
    try:
        ls = c.ctr("task", "ls").stdout.decode()
        assert "kc-long" in ls and "RUNNING" in ls
        c.ctr("task", "exec", "--exec-id", "e1", "kc-long", "echo", "exec-ok")
        assert "exec-ok" in c.ctr("task", "exec", "--exec-id", "e2", "kc-long", "echo", "exec-ok").stdout.decode()
        c.ctr("task", "kill", "-s", "SIGTERM", "kc-long")
        for _ in range(100):
            if "STOPPED" in c.ctr("task", "ls").stdout.decode():
                break
            time.sleep(0.1)
        assert "STOPPED" in c.ctr("task", "ls").stdout.decode()
    finally:
        c.ctr("task", "rm", "-f", "kc-long", check=False)
        c.ctr("container", "rm", "kc-long", check=False)
    for _ in range(50):
        if not shim_processes(str(c.dir)):
            break
        time.sleep(0.1)
    assert shim_processes(str(c.dir)) == []
