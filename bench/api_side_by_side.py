"""Nest's API beside a minimal FastAPI app on the same stack, in one run, with the ratios.

Each app gets its own copy of the same seeded Foundry DB (10,000 clusters) and runs alone while
it is measured, as one uvicorn worker on uvloop + httptools:

- `nest`: `nest run api` (auth, middleware, problem documents, the outbox, the audit log);
- `raw`: bench/baseline_app.py on the driver directly (aiosqlite / asyncpg);
- `orm`: bench/baseline_app.py with one SQLAlchemy async ORM session per request.

`wrk` drives each path (`apt-get install -y wrk`): GET one cluster and GET a page of 100 at
16 connections, POST a cluster at 16 connections and from one client. Then the projector:
N status events (one per cluster, for `--events` clusters) published to NEST_EVENTS before the
API starts, and the time the projector takes to apply them all.

    python bench/api_side_by_side.py --db sqlite
    python bench/api_side_by_side.py --db postgres --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.bus import Bus  # noqa: E402
from libs.common.contract.cluster import ClusterSpec, ClusterStatusChanged, Condition  # noqa: E402
from libs.common.nats_server import EmbeddedNats, free_port  # noqa: E402
from libs.common.settings import Settings  # noqa: E402
from services.api.kit.db import Database  # noqa: E402
from services.api.models import Cluster  # noqa: E402
from tests.support.processes import ADMIN_TOKEN, kill_group, nest_process, wait_http  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/postgres"
AUTH_HEADER = f"Authorization: Bearer {ADMIN_TOKEN}"
CREATE_LUA = """
counter = 0
prefix = os.getenv("NAME_PREFIX") or "w"
path = os.getenv("CREATE_PATH")
auth = os.getenv("AUTH")
request = function()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json"}
  if auth ~= nil and auth ~= "" then headers["Authorization"] = auth end
  return wrk.format("POST", path, headers, '{"name":"' .. prefix .. counter .. '"}')
end
"""


async def seed(url: str, count: int) -> list[str]:
    db = Database(Settings(database_url=url).resolved_database_url)
    await db.migrate()
    spec = ClusterSpec().wire()
    start = datetime.now(UTC)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    async with db.orm_sessions() as session:
        for batch in range(0, count, 1000):
            session.add_all(
                Cluster(
                    id=ids[i],
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
                    status_sequence=0,
                    version=1,
                )
                for i in range(batch, min(batch + 1000, count))
            )
            await session.commit()
    await db.dispose()
    return ids


async def fresh_database(kind: str, tmp: Path, name: str) -> str:
    if kind == "sqlite":
        (tmp / name).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{tmp / name / 'nest.db'}"
    db_name = f"nest_bench_{name}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(PG)
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    await admin.close()
    return PG.rsplit("/", 1)[0] + "/" + db_name


async def drop_databases(urls: list[str]) -> None:
    admin = await asyncpg.connect(PG)
    for url in urls:
        if url.startswith("postgresql"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    await admin.close()


def wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    auth: bool,
    script: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if auth:
        command[1:1] = ["-H", AUTH_HEADER]
    if script is not None:
        command[1:1] = ["-s", str(script)]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def ms(label: str) -> float:
        found = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        if not found:
            return float("nan")
        value, unit = float(found.group(1)), found.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "rate": float(rate.group(1)) if rate else 0.0,
        "p50": ms("50%"),
        "p99": ms("99%"),
        "errors": int(errors.group(1)) if errors else 0,
    }


def fmt(result: dict[str, Any]) -> str:
    text = f"{result['rate']:7.0f} req/s p50 {result['p50']:6.2f} ms p99 {result['p99']:6.2f} ms"
    return text + (f" ERRORS {result['errors']}" if result["errors"] else "")


def measure(
    base: str, prefix: str, one_id: str, args: argparse.Namespace, tmp: Path, auth: bool, tag: str
) -> dict[str, dict[str, Any]]:
    script = tmp / "create.lua"
    script.write_text(CREATE_LUA)
    results: dict[str, dict[str, Any]] = {}
    seconds = args.seconds
    results["get"] = wrk(
        f"{base}{prefix}/clusters/{one_id}", seconds=seconds, connections=16, auth=auth
    )
    results["page"] = wrk(
        f"{base}{prefix}/clusters?limit=100", seconds=seconds, connections=16, auth=auth
    )
    env = {
        "CREATE_PATH": f"{prefix}/clusters",
        "AUTH": AUTH_HEADER.split(": ", 1)[1] if auth else "",
    }
    results["create16"] = wrk(
        f"{base}{prefix}/clusters",
        seconds=seconds,
        connections=16,
        auth=False,
        script=script,
        env={**env, "NAME_PREFIX": f"{tag}c"},
    )
    results["create1"] = wrk(
        f"{base}{prefix}/clusters",
        seconds=seconds,
        connections=1,
        auth=False,
        script=script,
        env={**env, "NAME_PREFIX": f"{tag}s"},
    )
    return results


def status_event(cluster_id: str) -> ClusterStatusChanged:
    return ClusterStatusChanged(
        cluster_id=cluster_id,
        observed_generation=1,
        phase="Ready",
        reason="",
        message="all replicas ready",
        conditions=[
            Condition(
                type="ControlPlaneReady",
                status="True",
                reason="Available",
                message="2/2 replicas ready",
                last_transition_time=datetime.now(UTC),
            )
        ],
    )


async def projector_rate(kind: str, tmp: Path, count: int) -> tuple[float, int]:
    """Status events applied per second by the projector (events published beforehand)."""
    import uvloop  # noqa: F401  (the API runs on it; the measurement below runs on this loop)

    from services.api.app import create_app

    url = await fresh_database(kind, tmp, "projector")
    ids = await seed(url, count)
    nats = EmbeddedNats(tmp / "nats-projector")
    nats.start()
    try:
        bus = Bus([nats.url], name="bench-publisher")
        await bus.connect()
        await bus.ensure_streams()
        for cluster_id in ids:
            await bus.publish(status_event(cluster_id), source="provisioner", subject=cluster_id)
        await bus.close()
        settings = Settings(
            data_dir=tmp / "projector",
            database_url=url,
            nats_url=nats.url,
            admin_token=ADMIN_TOKEN,
            log_level="WARNING",
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            projector = app.state.projector
            while projector.handled == 0:
                await asyncio.sleep(0.001)
            started, first = time.perf_counter(), projector.handled
            while projector.handled < count:
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            batches = projector.batches
        return (count - first) / elapsed, batches
    finally:
        nats.stop()
        if kind == "postgres":
            await drop_databases([url])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--skip", default="", help="comma-separated: nest,raw,orm,projector")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="nest-side-by-side-"))
    urls: list[str] = []
    table: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for target in ("nest", "raw", "orm"):
            if target in skip:
                continue
            url = await fresh_database(args.db, tmp, target)
            urls.append(url)
            ids = await seed(url, args.clusters)
            port = free_port()
            if target == "nest":
                nats = EmbeddedNats(tmp / "nats")
                nats.start()
                env = {
                    "NEST_DATA_DIR": str(tmp / target),
                    "NEST_NATS_URL": nats.url,
                    "NEST_API_PORT": str(port),
                    "NEST_DATABASE_URL": url,
                    "NEST_LOG_LEVEL": "WARNING",
                }
                process = nest_process(["run", "api"], env, tmp / "nest.log")
                prefix, auth = "/api/v1", True
            else:
                nats = None
                log = (tmp / f"{target}.log").open("ab")
                process = subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "baseline_app.py"),
                        "--db-url",
                        url,
                        "--mode",
                        target,
                        "--port",
                        str(port),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=ROOT,
                )
                prefix, auth = "", False
            base = f"http://127.0.0.1:{port}"
            try:
                wait_http(
                    f"{base}/readyz" if target == "nest" else f"{base}/clusters?limit=1",
                    timeout=60,
                    process=process,
                )
                table[target] = measure(base, prefix, ids[len(ids) // 2], args, tmp, auth, target)
            finally:
                kill_group(process)
                if nats is not None:
                    nats.stop()
        print(f"# side by side: {args.db}, {args.clusters} clusters, wrk {args.seconds} s per path")
        labels = {
            "get": "GET /clusters/{id}, c16",
            "page": "GET a page of 100, c16",
            "create16": "POST /clusters, c16",
            "create1": "POST /clusters, 1 client",
        }
        for key, label in labels.items():
            print(f"{label}")
            for target, results in table.items():
                ratio = ""
                if target == "nest" and "raw" in table and table["raw"][key]["rate"]:
                    ratio = f"   = {results[key]['rate'] / table['raw'][key]['rate']:.2f}x raw"
                print(f"  {target:<5} {fmt(results[key])}{ratio}")
        if "projector" not in skip:
            rate, batches = await projector_rate(args.db, tmp, args.events)
            print(
                f"projector: {rate:,.0f} status events/s applied ({args.events} events, "
                f"{batches} batches)"
            )
    finally:
        if args.db == "postgres":
            await drop_databases(urls)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
