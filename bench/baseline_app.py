"""The minimal FastAPI baseline the API is measured against (bench/api_side_by_side.py).

The same stack as `nest run api` (FastAPI, uvicorn, uvloop, httptools, one worker, the same
Foundry DB file and schema) with nothing of Nest's: no auth, no middleware, no models. Two
flavours of data access:

- `raw`: the driver directly (aiosqlite: one connection; asyncpg: a pool), SQL text;
- `orm`: one SQLAlchemy async ORM session per request, as Nest did before issue 10.

    python bench/baseline_app.py --db-url sqlite:///path/nest.db --mode raw --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiosqlite
import asyncpg
import uvicorn
import uvloop
from fastapi import FastAPI, Request, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

COLUMNS = (
    "id, name, labels, spec, generation, created_at, updated_at, phase, observed_generation, "
    "status_reason, status_message, conditions, endpoint, version"
)
SPEC = {"kubernetesVersion": "1.36.3"}


def _row(names: list[str], row: Any) -> dict[str, Any]:
    item = dict(zip(names, row, strict=True))
    for key in ("labels", "spec", "conditions", "endpoint"):
        if isinstance(item[key], str):
            item[key] = json.loads(item[key])
    for key in ("created_at", "updated_at"):
        item[key] = str(item[key])
    return item


NAMES = [c.strip() for c in COLUMNS.split(",")]


def raw_sqlite(path: str) -> FastAPI:
    state: dict[str, aiosqlite.Connection] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        conn = await aiosqlite.connect(path)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"):
            await conn.execute(f"PRAGMA {pragma}")
        state["db"] = conn
        yield
        await conn.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/clusters/{cluster_id}")
    async def get_one(cluster_id: str) -> Response:
        rows = await state["db"].execute_fetchall(
            f"SELECT {COLUMNS} FROM clusters WHERE id = ?",
            (cluster_id,),
        )
        if not rows:
            return Response(status_code=404)
        return Response(json.dumps(_row(NAMES, rows[0])), media_type="application/json")

    @app.get("/clusters")
    async def page(limit: int = 100) -> Response:
        rows = await state["db"].execute_fetchall(
            f"SELECT {COLUMNS} FROM clusters ORDER BY created_at, id LIMIT ?",
            (limit + 1,),
        )
        items = [_row(NAMES, r) for r in rows[:limit]]
        return Response(json.dumps({"items": items}), media_type="application/json")

    @app.post("/clusters", status_code=201)
    async def create(request: Request) -> Response:
        body = await request.json()
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        ident = str(uuid.uuid4())
        db = state["db"]
        await db.execute(
            "INSERT INTO clusters (id, name, labels, spec, generation, created_at, updated_at, "
            "phase, observed_generation, status_reason, status_message, conditions, "
            "status_sequence, version) VALUES (?, ?, '{}', ?, 1, ?, ?, 'Pending', 0, '', '', "
            "'[]', 0, 1)",
            (ident, body["name"], json.dumps(SPEC), now, now),
        )
        await db.commit()
        return Response(json.dumps({"id": ident}), 201, media_type="application/json")

    return app


def raw_postgres(dsn: str) -> FastAPI:
    state: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["db"] = await asyncpg.create_pool(dsn, min_size=4, max_size=16)
        yield
        await state["db"].close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/clusters/{cluster_id}")
    async def get_one(cluster_id: str) -> Response:
        row = await state["db"].fetchrow(
            f"SELECT {COLUMNS} FROM clusters WHERE id = $1",
            cluster_id,
        )
        if row is None:
            return Response(status_code=404)
        return Response(json.dumps(_row(NAMES, tuple(row))), media_type="application/json")

    @app.get("/clusters")
    async def page(limit: int = 100) -> Response:
        rows = await state["db"].fetch(
            f"SELECT {COLUMNS} FROM clusters ORDER BY created_at, id LIMIT $1",
            limit + 1,
        )
        items = [_row(NAMES, tuple(r)) for r in rows[:limit]]
        return Response(json.dumps({"items": items}), media_type="application/json")

    @app.post("/clusters", status_code=201)
    async def create(request: Request) -> Response:
        body = await request.json()
        now = datetime.now(UTC)
        ident = str(uuid.uuid4())
        await state["db"].execute(
            "INSERT INTO clusters (id, name, labels, spec, generation, created_at, updated_at, "
            "phase, observed_generation, status_reason, status_message, conditions, "
            "status_sequence, version) VALUES ($1, $2, '{}', $3, 1, $4, $4, 'Pending', 0, '', "
            "'', '[]', 0, 1)",
            ident,
            body["name"],
            json.dumps(SPEC),
            now,
        )
        return Response(json.dumps({"id": ident}), 201, media_type="application/json")

    return app


def orm_app(url: str) -> FastAPI:
    from services.api.models import Cluster

    engine = create_async_engine(
        url, **({"pool_size": 1, "max_overflow": 0} if url.startswith("sqlite") else {})
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()

    def as_dict(c: Cluster) -> dict[str, Any]:
        return {
            "id": c.id,
            "name": c.name,
            "labels": c.labels,
            "spec": c.spec,
            "generation": c.generation,
            "createdAt": str(c.created_at),
            "phase": c.phase,
        }

    @app.get("/clusters/{cluster_id}")
    async def get_one(cluster_id: str) -> Response:
        async with sessions() as session:
            cluster = await session.scalar(select(Cluster).where(Cluster.id == cluster_id))
        if cluster is None:
            return Response(status_code=404)
        return Response(json.dumps(as_dict(cluster)), media_type="application/json")

    @app.get("/clusters")
    async def page(limit: int = 100) -> Response:
        async with sessions() as session:
            rows = (
                await session.scalars(
                    select(Cluster).order_by(Cluster.created_at, Cluster.id).limit(limit + 1)
                )
            ).all()
        items = [as_dict(c) for c in rows[:limit]]
        return Response(json.dumps({"items": items}), media_type="application/json")

    @app.post("/clusters", status_code=201)
    async def create(request: Request) -> Response:
        body = await request.json()
        now = datetime.now(UTC)
        cluster = Cluster(
            id=str(uuid.uuid4()),
            name=body["name"],
            labels={},
            spec=SPEC,
            generation=1,
            created_at=now,
            updated_at=now,
            phase="Pending",
            observed_generation=0,
            status_reason="",
            status_message="",
            conditions=[],
            endpoint=None,
            status_sequence=0,
            version=1,
        )
        async with sessions() as session:
            session.add(cluster)
            await session.commit()
        return Response(json.dumps({"id": cluster.id}), 201, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--mode", choices=["raw", "orm"], default="raw")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    url: str = args.db_url
    if args.mode == "orm":
        async_url = url.replace("sqlite://", "sqlite+aiosqlite://").replace(
            "postgresql://", "postgresql+asyncpg://"
        )
        app = orm_app(async_url)
    elif url.startswith("sqlite"):
        app = raw_sqlite(url.removeprefix("sqlite:///"))
    else:
        app = raw_postgres(url)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
