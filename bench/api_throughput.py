"""Cluster API benchmark: create/list throughput and latency, and POST-to-consumer intent latency.

Runs `nest run api` as a real process (uvicorn, one worker) against an embedded nats-server, on
SQLite or PostgreSQL, and drives it over loopback with httpx from this process.

    python bench/api_throughput.py --db sqlite --creates 2000 --concurrency 16
    python bench/api_throughput.py --db postgres
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.bus import Bus  # noqa: E402
from libs.common.contract import INTENTS_STREAM, Envelope  # noqa: E402
from libs.common.nats_server import EmbeddedNats, free_port  # noqa: E402
from tests.support.processes import AUTH, kill_group, nest_process, wait_http  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(label: str, latencies: list[float], elapsed: float) -> None:
    print(
        f"{label:<28} {len(latencies) / elapsed:8.0f} req/s   p50 {pct(latencies, 0.5):6.1f} ms"
        f"   p99 {pct(latencies, 0.99):6.1f} ms   (n={len(latencies)})"
    )


async def run_load(
    client: httpx.AsyncClient, count: int, concurrency: int, make
) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            response = await make(client, i)
            latencies.append(time.perf_counter() - t0)
            assert response.status_code < 300, response.text

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def intent_latency(base: str, nats_url: str, count: int) -> list[float]:
    """Sequential POSTs; a consumer stamps when each reconcile intent arrives."""
    bus = Bus([nats_url], name="bench-consumer")
    await bus.connect()
    sub = await bus.nc.jetstream().pull_subscribe(
        "nest.intent.provisioner.>", durable="bench", stream=INTENTS_STREAM
    )
    # Drain what the throughput phase left on the work queue.
    while True:
        try:
            for msg in await sub.fetch(500, timeout=0.5):
                await msg.ack()
        except Exception:
            break
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    async def consume() -> None:
        while len(latencies) < count:
            try:
                msgs = await sub.fetch(10, timeout=0.2)
            except Exception:
                continue
            now = time.perf_counter()
            for msg in msgs:
                envelope = Envelope.from_bytes(msg.data)
                if envelope.subject in sent:
                    latencies.append(now - sent[envelope.subject])
                await msg.ack()
        done.set()

    consumer = asyncio.create_task(consume())
    async with httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        for i in range(count):
            t0 = time.perf_counter()
            response = await client.post("/api/v1/clusters", json={"name": f"lat-{i}"})
            sent[response.json()["id"]] = t0
            await asyncio.sleep(0.01)
    await asyncio.wait_for(done.wait(), 60)
    consumer.cancel()
    await bus.close()
    return latencies


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--creates", type=int, default=2000)
    parser.add_argument("--lists", type=int, default=2000)
    parser.add_argument("--intents", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="nest-bench-"))
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
    }
    if database_url:
        env["NEST_DATABASE_URL"] = database_url
    api = nest_process(["run", "api"], env, tmp / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", timeout=60, process=api)
        print(
            f"# Nest API benchmark: {args.db}, concurrency {args.concurrency},"
            f" {os.cpu_count()} CPUs"
        )
        limits = httpx.Limits(
            max_connections=args.concurrency, max_keepalive_connections=args.concurrency
        )
        async with httpx.AsyncClient(
            base_url=base, limits=limits, timeout=30, headers=AUTH
        ) as client:
            lat, elapsed = await run_load(
                client,
                args.creates,
                args.concurrency,
                lambda c, i: c.post("/api/v1/clusters", json={"name": f"bench-{i}"}),
            )
            report("POST /clusters", lat, elapsed)
            lat, elapsed = await run_load(
                client,
                args.lists,
                args.concurrency,
                lambda c, i: c.get("/api/v1/clusters", params={"limit": 100}),
            )
            report("GET /clusters?limit=100", lat, elapsed)
            ids = [
                item["id"]
                for item in (await client.get("/api/v1/clusters", params={"limit": 500})).json()[
                    "items"
                ]
            ]
            lat, elapsed = await run_load(
                client,
                args.lists,
                args.concurrency,
                lambda c, i: c.get(f"/api/v1/clusters/{ids[i % len(ids)]}"),
            )
            report("GET /clusters/{id}", lat, elapsed)
        latencies = await intent_latency(base, nats.url, args.intents)
        print(
            f"{'intent POST->consumer':<28}            p50 {pct(latencies, 0.5):6.1f} ms"
            f"   p99 {pct(latencies, 0.99):6.1f} ms   (n={len(latencies)}, mean "
            f"{statistics.mean(latencies) * 1000:.1f} ms)"
        )
    finally:
        kill_group(api)
        nats.stop()
        if db_name:
            admin = await asyncpg.connect(PG)
            await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
