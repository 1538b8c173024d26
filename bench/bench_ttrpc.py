"""ttrpc over a Unix socket: sequential round-trip latency and pipelined throughput.

One Server (containerd.task.v2.Task State echo) and one Client in the same event loop; first
N sequential calls (latency p50/p99), then N calls with up to CONCURRENCY in flight on the
same connection (req/s). N = KC_BENCH_TTRPC_N (default 5000). Baseline: the same sequential
round trip of the raw 10-byte-header frames without protobuf or dispatch, in the same run.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

from proto.containerd.task.v2 import shim_pb2
from ttrpc import Client, Server, ServerContext, framing

SVC = "containerd.task.v2.Task"
CONCURRENCY = 64


async def _state(req: shim_pb2.StateRequest, ctx: ServerContext) -> shim_pb2.StateResponse:
    return shim_pb2.StateResponse(id=req.id, pid=1)


async def _raw_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (frame := await framing.read_frame(reader)) is not None:
        writer.write(framing.encode(frame.stream_id, framing.MSG_RESPONSE, frame.payload))
    writer.close()


async def _run(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kc-bench-ttrpc-") as tmp:
        server = Server()
        server.register(SVC, "State", shim_pb2.StateRequest, _state)
        path = os.path.join(tmp, "t.sock")
        await server.start_unix(path)
        raw_srv = await asyncio.start_unix_server(_raw_echo, os.path.join(tmp, "raw.sock"))
        client = await Client.connect_unix(path)
        req = shim_pb2.StateRequest(id="bench")
        lat: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.call(SVC, "State", req, shim_pb2.StateResponse)
            lat.append(time.perf_counter() - t0)

        sem = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with sem:
                await client.call(SVC, "State", req, shim_pb2.StateResponse)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        pipelined = time.perf_counter() - t0

        r, w = await asyncio.open_unix_connection(os.path.join(tmp, "raw.sock"))
        raw_lat: list[float] = []
        payload = req.SerializeToString()
        for i in range(n):
            t0 = time.perf_counter()
            w.write(framing.encode(2 * i + 1, framing.MSG_REQUEST, payload))
            await framing.read_frame(r)
            raw_lat.append(time.perf_counter() - t0)
        w.close()
        await client.close()
        await server.close()
        raw_srv.close()
        await raw_srv.wait_closed()

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[int(p) - 1] * 1e6

    print(f"ttrpc call, sequential : p50 {q(lat, 50):7.1f} us  p99 {q(lat, 99):7.1f} us  "
          f"{n / sum(lat):8.0f} req/s")
    print(f"raw frame echo baseline: p50 {q(raw_lat, 50):7.1f} us  p99 {q(raw_lat, 99):7.1f} us  "
          f"{n / sum(raw_lat):8.0f} req/s  (ttrpc/raw p50 = {q(lat, 50) / q(raw_lat, 50):.2f}x)")
    print(f"ttrpc call, {CONCURRENCY} in flight: {n / pipelined:8.0f} req/s")


def main() -> None:
    asyncio.run(_run(int(os.environ.get("KC_BENCH_TTRPC_N", "5000"))))


if __name__ == "__main__":
    main()
