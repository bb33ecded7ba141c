"""SSE fan-out benchmark: N subscribers on /api/v1/events/stream while M events are published.

Runs `nest run api` as a real process (uvicorn, one worker) against an embedded nats-server, on
SQLite or PostgreSQL. This process publishes events to NEST_EVENTS; the subscribers run in a few
child processes (so the clients are not the bottleneck). Latency is from the publish call to each
subscriber's receipt (wall clock, same machine); total time from the first publish to the last
event reaching the last subscriber.

    python bench/sse_fanout.py --db sqlite --subscribers 100 --events 1000
    python bench/sse_fanout.py --db postgres --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.bus import Bus  # noqa: E402
from libs.common.contract import envelope_for  # noqa: E402
from libs.common.contract.cluster import ClusterDeleted  # noqa: E402
from libs.common.nats_server import EmbeddedNats, free_port  # noqa: E402
from tests.support.processes import AUTH, kill_group, nest_process, wait_http  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _subscribe(
    session: aiohttp.ClientSession,
    url: str,
    count: int,
    received: list[tuple[str, float]],
    reconnects: list[int],
) -> None:
    """Read `count` events; if the server drops the stream (lagging), resume from the last id."""
    got = 0
    last_id: str | None = None
    while got < count:
        headers = {**AUTH, "Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
            reconnects.append(1)
        async with session.get(url, headers=headers) as response:
            response.raise_for_status()
            async for line in response.content:
                if line.startswith(b"id: "):
                    last_id = line[4:].strip().decode()
                if not line.startswith(b"data: "):
                    continue
                received.append((json.loads(line[6:])["id"], time.time()))
                got += 1
                if got == count:
                    return


def subscriber_process(url: str, streams: int, count: int, ready: Any, results: Any) -> None:
    """One process holding `streams` SSE connections (so the clients are not the bottleneck)."""

    async def main() -> None:
        received: list[tuple[str, float]] = []
        reconnects: list[int] = []
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [
                asyncio.create_task(_subscribe(session, url, count, received, reconnects))
                for _ in range(streams)
            ]
            await asyncio.sleep(1.0)
            ready.put(streams)
            await asyncio.gather(*tasks)
        results.put((received, len(reconnects)))

    asyncio.run(main())


async def run(
    base: str, nats_url: str, subscribers: int, events: int, rate: float, processes: int
) -> None:
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    shares = [subscribers // processes + (i < subscribers % processes) for i in range(processes)]
    workers = [
        context.Process(
            target=subscriber_process,
            args=(f"{base}/api/v1/events/stream", n, events, ready, results),
        )
        for n in shares
        if n
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        await asyncio.to_thread(ready.get, True, 60)
    await asyncio.sleep(0.5)
    bus = Bus([nats_url], name="bench-publisher")
    await bus.connect()
    sent: dict[str, float] = {}
    started = time.time()
    for i in range(events):
        payload = ClusterDeleted(cluster_id=f"bench-{i}", observed_generation=1)
        subject, envelope = envelope_for(payload, source="bench", subject=payload.cluster_id)
        sent[envelope.id] = time.time()
        await bus.publish_envelope(subject, envelope)
        if rate > 0:
            await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.time()))
    published = time.time() - started
    received: list[tuple[str, float]] = []
    reconnects = 0
    for _ in workers:
        got, again = await asyncio.to_thread(results.get, True, 600)
        received += got
        reconnects += again
    for worker in workers:
        worker.join(10)
    await bus.close()
    latencies = [at - sent[event_id] for event_id, at in received]
    total = max(at for _, at in received) - started
    mode = f"paced at {rate:g}/s" if rate > 0 else "as fast as possible"
    print(f"{subscribers} subscribers x {events} events, published {mode}")
    print(f"  publish time                          {published:8.2f} s")
    print(f"  total (first publish -> last receipt) {total:8.2f} s")
    print(f"  deliveries                            {len(latencies):8d}")
    print(f"  reconnects (dropped as lagging)       {reconnects:8d}")
    print(f"  latency p50                           {pct(latencies, 0.5):8.1f} ms")
    print(f"  latency p99                           {pct(latencies, 0.99):8.1f} ms")
    print(f"  latency max                           {max(latencies) * 1000:8.1f} ms")
    print(f"  throughput                            {len(latencies) / total:8.0f} deliveries/s")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: as fast as possible")
    parser.add_argument("--processes", type=int, default=4, help="subscriber processes")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="nest-bench-sse-"))
    database_url = None
    db_name = None
    if args.db == "postgres":
        db_name = f"nest_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(PG)
        await admin.execute(f'CREATE DATABASE "{db_name}"')
        await admin.close()
        database_url = PG.rsplit("/", 1)[0] + "/" + db_name
    nats = EmbeddedNats(tmp / "nats")
    nats.start()
    port = free_port()
    env = {
        "NEST_DATA_DIR": str(tmp / "data"),
        "NEST_NATS_URL": nats.url,
        "NEST_API_PORT": str(port),
        "NEST_LOG_LEVEL": "WARNING",
        "NEST_RATE_LIMIT_BURST": "100000",
        "NEST_RATE_LIMIT_PER_SECOND": "100000",
    }
    if database_url:
        env["NEST_DATABASE_URL"] = database_url
    api = nest_process(["run", "api"], env, tmp / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", timeout=60, process=api)
        print(f"# Nest SSE fan-out benchmark — {args.db}, {os.cpu_count()} CPUs")
        await run(base, nats.url, args.subscribers, args.events, args.rate, args.processes)
    finally:
        kill_group(api)
        nats.stop()
        if db_name:
            admin = await asyncpg.connect(PG)
            await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
