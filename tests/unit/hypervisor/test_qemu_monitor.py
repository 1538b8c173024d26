"""QmpMonitor against a scripted QMP server on a unix socket (speaks the wire protocol only)."""
import asyncio
import json
import os

import pytest

from common.errors import ConnectionClosed, DeadlineExceeded, HypervisorError
from hypervisor.qemu.monitor import QmpMonitor

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}


class FakeQmp:
    """Answers commands from ``replies`` (name → return value, or callable(args) → message)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.replies: dict = {"query-status": {"running": True, "status": "running",
                                               "singlestep": False}}
        self.received: list[dict] = []
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def event(self, name: str, data: dict) -> None:
        assert self.writer is not None
        self.writer.write(json.dumps({"event": name, "data": data,
                                      "timestamp": {"seconds": 1, "microseconds": 0}}).encode() + b"\n")
        await self.writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        writer.write(json.dumps(GREETING).encode() + b"\n")
        await writer.drain()
        async for msg in self._messages(reader):
            self.received.append(msg)
            cmd = msg["execute"]
            reply = {} if cmd == "qmp_capabilities" else self.replies.get(cmd)
            if reply == "silence":
                continue
            if callable(reply):
                out = await reply(msg.get("arguments", {}))
            elif reply is None:
                out = {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
            else:
                out = {"return": reply}
            if "id" in msg:
                out["id"] = msg["id"]
            writer.write(json.dumps(out).encode() + b"\n")
            await writer.drain()
            if cmd == "quit":
                writer.close()
                return

    @staticmethod
    async def _messages(reader: asyncio.StreamReader):
        """Messages are concatenated JSON objects, not necessarily newline-terminated."""
        decoder = json.JSONDecoder()
        buf = ""
        while chunk := await reader.read(4096):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def fake(tmp_path):
    srv = FakeQmp(str(tmp_path / "qmp.sock"))
    yield srv
    await srv.close()


async def test_connect_retries_until_socket_appears(fake):
    mon = QmpMonitor(fake.path)

    async def late_start():
        await asyncio.sleep(0.3)
        await fake.start()

    starter = asyncio.create_task(late_start())
    await mon.connect(timeout=5)
    await starter
    assert (await mon.query_status())["status"] == "running"
    assert [m["execute"] for m in fake.received] == ["qmp_capabilities", "query-status"]
    await mon.close()
    await mon.close()  # idempotent


async def test_connect_gives_up_at_deadline(tmp_path):
    mon = QmpMonitor(str(tmp_path / "never.sock"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(DeadlineExceeded):
        await mon.connect(timeout=0.3)
    assert loop.time() - t0 < 2
    assert not mon.connected


async def test_events_are_dispatched_by_name(fake):
    await fake.start()
    mon = QmpMonitor(fake.path)
    await mon.connect(timeout=5)
    seen: dict[str, list] = {"STOP": [], "*": [], "BALLOON_CHANGE": []}
    mon.add_listener("STOP", seen["STOP"].append)
    mon.add_listener("*", seen["*"].append)
    mon.add_listener("BALLOON_CHANGE", seen["BALLOON_CHANGE"].append)

    def broken(_ev):
        raise RuntimeError("listener bug")

    mon.add_listener("STOP", broken)
    await fake.event("STOP", {})
    await fake.event("BALLOON_CHANGE", {"actual": 123})
    for _ in range(100):
        if len(seen["*"]) == 2:
            break
        await asyncio.sleep(0.01)
    assert [e["event"] for e in seen["STOP"]] == ["STOP"]
    assert seen["BALLOON_CHANGE"][0]["data"] == {"actual": 123}
    assert [e["event"] for e in seen["*"]] == ["STOP", "BALLOON_CHANGE"]
    await mon.close()


async def test_device_del_waits_for_matching_device_deleted(fake):
    await fake.start()
    mon = QmpMonitor(fake.path)
    await mon.connect(timeout=5)

    async def on_device_del(args):
        async def later():
            await asyncio.sleep(0.05)
            # virtio backends send one without "device" and other devices may go away first
            await fake.event("DEVICE_DELETED", {"path": "/machine/peripheral/nic0/virtio-backend"})
            await fake.event("DEVICE_DELETED", {"device": "other", "path": "/x"})
            await asyncio.sleep(0.2)
            await fake.event("DEVICE_DELETED", {"device": args["id"], "path": "/y"})
        asyncio.get_running_loop().create_task(later())
        return {"return": {}}

    fake.replies["device_del"] = on_device_del
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await mon.device_del("nic0", timeout=5)
    assert loop.time() - t0 >= 0.2
    await mon.close()


async def test_device_del_times_out_without_event(fake):
    await fake.start()
    fake.replies["device_del"] = {}
    mon = QmpMonitor(fake.path)
    await mon.connect(timeout=5)
    with pytest.raises(DeadlineExceeded):
        await mon.device_del("nic0", timeout=0.2)
    await mon.close()


async def test_errors_map_to_hierarchy(fake):
    await fake.start()
    fake.replies["query-cpus-fast"] = [
        {"cpu-index": 0, "thread-id": 101, "qom-path": "/machine/unattached/device[0]",
         "props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "target": "x86_64"},
        {"cpu-index": 1, "thread-id": 102, "qom-path": "/machine/unattached/device[1]",
         "props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "target": "x86_64"}]
    fake.replies["query-balloon"] = {"actual": 536870912}
    fake.replies["stop"] = "silence"
    mon = QmpMonitor(fake.path, command_timeout=0.3)
    await mon.connect(timeout=5)
    cpus = await mon.query_cpus_fast()
    assert [(c.cpu_index, c.thread_id, c.props["socket-id"]) for c in cpus] == [(0, 101, 0), (1, 102, 1)]
    assert await mon.query_balloon() == 536870912
    with pytest.raises(HypervisorError, match="CommandNotFound"):
        await mon.execute("no-such-command")
    with pytest.raises(DeadlineExceeded):
        await mon.stop()
    await mon.close()
    with pytest.raises(ConnectionClosed):
        await mon.query_status()


async def test_quit_tolerates_eof(fake):
    await fake.start()
    fake.replies["quit"] = {}
    mon = QmpMonitor(fake.path)
    await mon.connect(timeout=5)
    await mon.quit()
    await mon.close()
    assert fake.received[-1]["execute"] == "quit"


async def test_send_fd_passes_descriptor_then_getfd(fake, tmp_path):
    await fake.start()
    fake.replies["getfd"] = {}
    mon = QmpMonitor(fake.path)
    await mon.connect(timeout=5)
    r, w = os.pipe()
    try:
        await mon.send_fd(r, "tap0")
    finally:
        os.close(r)
        os.close(w)
    assert fake.received[-1]["execute"] == "getfd"
    assert fake.received[-1]["arguments"] == {"fdname": "tap0"}
    await mon.close()
