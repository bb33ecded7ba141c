"""Read benchmark with authentication on: GET one cluster and GET a page of 100 out of 10,000.

Seeds 10,000 clusters straight into the Foundry DB, runs `nest run api` (uvicorn, one worker),
drives it over loopback with httpx, and measures what authentication costs per request.

    python bench/api_reads.py --db sqlite
    python bench/api_reads.py --db postgres
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.contract.cluster import ClusterSpec  # noqa: E402
from libs.common.nats_server import EmbeddedNats, free_port  # noqa: E402
from libs.common.settings import Settings  # noqa: E402
from services.api.auth import service as auth  # noqa: E402
from services.api.kit.db import Database, create_engine, migrate, session_factory  # noqa: E402
from services.api.models import Cluster  # noqa: E402
from tests.support.processes import ADMIN_TOKEN, AUTH, kill_group, nest_process, wait_http  # noqa: E402

AUTH_HEADER = f"Authorization: Bearer {ADMIN_TOKEN}"

PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def seed(url: str, count: int) -> None:
    engine = create_engine(Settings(database_url=url).resolved_database_url)
    await migrate(engine)
    sessions = session_factory(engine)
    spec = ClusterSpec().wire()
    start = datetime.now(UTC)
    async with sessions() as session:
        for batch in range(0, count, 1000):
            session.add_all(
                Cluster(
                    id=str(uuid.uuid4()),
                    name=f"seed-{i:05d}",
                    labels={"team": f"t{i % 10}"},
                    spec=spec,
                    generation=1,
                    created_at=start + timedelta(microseconds=i),
                    updated_at=start,
                    phase="Ready",
                    observed_generation=1,
                    status_reason="",
                    status_message="",
                    conditions=[],
                    endpoint={"host": "10.0.0.1", "port": 6443},
                    status_sequence=i + 1,
                    version=1,
                )
                for i in range(batch, min(batch + 1000, count))
            )
            await session.commit()
    await engine.dispose()


async def load(
    client: httpx.AsyncClient, paths: list[str], concurrency: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    index = 0

    async def worker() -> None:
        nonlocal index
        while index < len(paths):
            path = paths[index]
            index += 1
            t0 = time.perf_counter()
            response = await client.get(path)
            latencies.append(time.perf_counter() - t0)
            assert response.status_code == 200, response.text

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(paths) / (time.perf_counter() - started), latencies


def line(label: str, rate: float, latencies: list[float]) -> None:
    print(
        f"{label:<34} {rate:7.0f} req/s   p50 {pct(latencies, 0.5):7.1f} ms"
        f"   p99 {pct(latencies, 0.99):7.1f} ms"
    )


async def page_through(client: httpx.AsyncClient, limit: int) -> list[str]:
    """Every cursor of a full walk (the first page has none)."""
    cursors: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/clusters", params=params)).json()
        cursor = page["next"]
        if not cursor:
            return cursors
        cursors.append(cursor)


async def report_reads(client: httpx.AsyncClient, args: argparse.Namespace) -> None:
    first = (await client.get("/api/v1/clusters", params={"limit": 500})).json()["items"]
    ids = [c["id"] for c in first]
    print(f"# reads with auth: {args.db}, {args.clusters} clusters, concurrency {args.concurrency}")
    paths = [f"/api/v1/clusters/{ids[i % len(ids)]}" for i in range(args.requests)]
    rate, latencies = await load(client, paths, args.concurrency)
    line("GET /clusters/{id}", rate, latencies)
    cursors = ["", *await page_through(client, 100)]
    pages = [
        "/api/v1/clusters?limit=100"
        + (f"&cursor={cursors[i % len(cursors)]}" if i % len(cursors) else "")
        for i in range(min(args.requests // 3, 1000))
    ]
    rate, latencies = await load(client, pages, args.concurrency)
    line(f"GET /clusters?limit=100 of {args.clusters}", rate, latencies)
    started = time.perf_counter()
    walked = len(await page_through(client, 500)) + 1
    print(f"walk all clusters, {walked} pages of 500: {time.perf_counter() - started:.2f} s")


def wrk(url: str, *, auth: bool = True, seconds: int = 10, connections: int = 16) -> str:
    """Drive one URL with wrk (a C load generator, so the client is not the bottleneck)."""
    if shutil.which("wrk") is None:
        return "wrk not installed (apt-get install wrk)"
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if auth:
        command[1:1] = ["-H", AUTH_HEADER]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+\w+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return (
        f"{float(rate.group(1)) if rate else 0:7.0f} req/s   p50 {p50.group(1) if p50 else '?'}"
        f"   p99 {p99.group(1) if p99 else '?'}"
        + (f"   NON-2xx: {errors.group(1)}" if errors else "")
    )


async def auth_cost_us(url: str) -> float:
    """Per-request cost of authentication on the hot path (a verified, cached token)."""
    db = Database(Settings(database_url=url).resolved_database_url)
    cache = auth.TokenCache()
    assert await auth.authenticate(db, cache, ADMIN_TOKEN) is not None
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        await auth.authenticate(db, cache, ADMIN_TOKEN)
    cost = (time.perf_counter() - t0) / n * 1e6
    await db.dispose()
    return cost


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nest-bench-"))
    db_name = None
    if args.db == "postgres":
        db_name = f"nest_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(PG)
        await admin.execute(f'CREATE DATABASE "{db_name}"')
        await admin.close()
        url = PG.rsplit("/", 1)[0] + "/" + db_name
    else:
        url = f"sqlite:///{tmp / 'data' / 'nest.db'}"
    (tmp / "data").mkdir()
    await seed(url, args.clusters)
    nats = EmbeddedNats(tmp / "nats")
    nats.start()
    port = free_port()
    env = {
        "NEST_DATA_DIR": str(tmp / "data"),
        "NEST_NATS_URL": nats.url,
        "NEST_API_PORT": str(port),
        "NEST_DATABASE_URL": url,
        "NEST_LOG_LEVEL": "WARNING",
    }
    api = nest_process(["run", "api"], env, tmp / "api.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", timeout=60, process=api)
        limits = httpx.Limits(max_connections=args.concurrency)
        async with httpx.AsyncClient(
            base_url=base, headers=AUTH, limits=limits, timeout=60
        ) as client:
            await report_reads(client, args)
            health_rate, _ = await load(client, ["/healthz"] * args.requests, args.concurrency)
            one = (await client.get("/api/v1/clusters", params={"limit": 1})).json()["items"][0]
            cursor = (await client.get("/api/v1/clusters", params={"limit": 100})).json()["next"]
        print("# the same with wrk (16 connections, 10 s), so the client is not the bottleneck:")
        one_url = f"{base}/api/v1/clusters/{one['id']}"
        print(f"{'GET /clusters/{id}':<34} {wrk(one_url)}")
        page_url = f"{base}/api/v1/clusters?limit=100&cursor={cursor}"
        print(f"{'GET /clusters?limit=100 (page 2)':<34} {wrk(page_url)}")
        print(f"{'GET /healthz (no auth, no DB)':<34} {wrk(f'{base}/healthz', auth=False)}")
        cost = await auth_cost_us(url)
        print(f"auth on the hot path: {cost:.1f} us per request (verified token, cached)")
        print(f"/healthz through the httpx client (its own ceiling): {health_rate:.0f} req/s")
    finally:
        kill_group(api)
        nats.stop()
        if db_name:
            admin = await asyncpg.connect(PG)
            await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
