"""Every query on the clusters table (lean SQL: the hottest reads and writes of the API)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from services.api.kit.db import Database, Row, Session, Sql, sql
from services.api.kit.paging import KEYSET_SQL, After
from services.api.kit.selectors import Requirement


@dataclass
class ClusterRow:
    """One row of `clusters`, decoded (JSON columns as Python values, aware timestamps)."""

    id: str
    name: str
    labels: dict[str, str]
    spec: dict[str, Any]
    generation: int
    created_at: datetime
    updated_at: datetime
    deletion_requested_at: datetime | None
    phase: str
    observed_generation: int
    status_reason: str
    status_message: str
    conditions: list[dict[str, Any]]
    endpoint: dict[str, Any] | None
    status_sequence: int
    version: int


COLUMNS = [f.name for f in fields(ClusterRow)]
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM clusters"  # noqa: S608
_JSON = {"labels", "spec", "conditions", "endpoint"}
_TIMES = {"created_at", "updated_at", "deletion_requested_at"}

_BY_ID = sql(f"{_SELECT} WHERE id = :id")
_BY_ID_FOR_UPDATE = sql(f"{_SELECT} WHERE id = :id FOR UPDATE")
_BY_NAME = sql(f"{_SELECT} WHERE name = :name")
_BY_REF = sql(f"{_SELECT} WHERE id = :ref OR name = :ref")
# Built from the dataclass's field names only (no input reaches these strings).
_INSERT = sql(
    f"INSERT INTO clusters ({', '.join(COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(':' + c for c in COLUMNS)})"
)
_SETS = ", ".join(f"{c} = :{c}" for c in COLUMNS if c not in ("id", "created_at"))
_UPDATE = sql(f"UPDATE clusters SET {_SETS} WHERE id = :id")  # noqa: S608
_UPDATE_STATUS = sql(
    "UPDATE clusters SET phase = :phase, observed_generation = :observed_generation, "
    "status_reason = :status_reason, status_message = :status_message, "
    "conditions = :conditions, endpoint = :endpoint, status_sequence = :status_sequence "
    "WHERE id = :id"
)
_DELETE = sql("DELETE FROM clusters WHERE id = :id")
_LIVE_IDS: dict[int, Sql] = {}


def decode(db: Database, row: Row) -> ClusterRow:
    values: dict[str, Any] = {}
    for name, value in zip(COLUMNS, row, strict=True):
        if name in _JSON:
            values[name] = db.loads(value)
        elif name in _TIMES:
            values[name] = db.moment_or_none(value)
        else:
            values[name] = value
    values["labels"] = values["labels"] or {}
    values["conditions"] = values["conditions"] or []
    return ClusterRow(**values)


def encode(db: Database, row: ClusterRow) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in COLUMNS:
        value = getattr(row, name)
        if name in _JSON:
            values[name] = None if value is None else db.dumps(value)
        elif name in _TIMES:
            values[name] = None if value is None else db.stamp(value)
        else:
            values[name] = value
    return values


async def _one(session: Session, statement: Sql, params: dict[str, Any]) -> ClusterRow | None:
    row = await session.fetchrow(statement, params)
    return None if row is None else decode(session.db, row)


async def get(session: Session, cluster_id: str, *, for_update: bool = False) -> ClusterRow | None:
    """By id; `for_update` locks the row for the rest of the unit of work's transaction."""
    if for_update:
        await session.lock()
        if not session.db.sqlite:
            return await _one(session, _BY_ID_FOR_UPDATE, {"id": cluster_id})
    return await _one(session, _BY_ID, {"id": cluster_id})


async def get_by_name(session: Session, name: str) -> ClusterRow | None:
    return await _one(session, _BY_NAME, {"name": name})


async def find(session: Session, ref: str, *, for_update: bool = False) -> ClusterRow | None:
    """By id, or else by name (an id wins should a name look like another cluster's id)."""
    if for_update:
        await session.lock()
    rows = [decode(session.db, row) for row in await session.fetch(_BY_REF, {"ref": ref})]
    match = next((r for r in rows if r.id == ref), None) or (rows[0] if rows else None)
    if match is not None and for_update and not session.db.sqlite:
        return await _one(session, _BY_ID_FOR_UPDATE, {"id": match.id})
    return match


def _label_condition(
    db: Database, requirement: Requirement, index: int, params: dict[str, Any]
) -> str:
    """One requirement as SQL over the JSON labels column (SQLite json_extract, PG ->>)."""
    key = f"k{index}"
    if db.sqlite:
        params[key] = '$."' + requirement.key + '"'
        value = f"json_extract(labels, :{key})"
    else:
        params[key] = requirement.key
        value = f"(labels ->> :{key})"
    names = []
    for n, item in enumerate(requirement.values):
        params[f"v{index}_{n}"] = item
        names.append(f":v{index}_{n}")
    listed = ", ".join(names)
    match requirement.operator:
        case "=":
            return f"{value} = {names[0]}"
        case "!=":
            return f"({value} IS NULL OR {value} != {names[0]})"
        case "in":
            return f"{value} IN ({listed})"
        case "notin":
            return f"({value} IS NULL OR {value} NOT IN ({listed}))"
        case "exists":
            return f"{value} IS NOT NULL"
        case _:
            return f"{value} IS NULL"


_PAGES: dict[str, Sql] = {}


async def list_page(
    session: Session,
    *,
    limit: int,
    after: After | None,
    selector: Sequence[Requirement] = (),
    phase: str | None = None,
) -> list[ClusterRow]:
    """Clusters ordered by (created_at, id), starting after the cursor; one extra to see if more."""
    db = session.db
    params: dict[str, Any] = {"limit": limit + 1}
    conditions = [_label_condition(db, r, i, params) for i, r in enumerate(selector)]
    if phase is not None:
        conditions.append("phase = :phase")
        params["phase"] = phase
    if after is not None:
        conditions.append(KEYSET_SQL)
        params["after_at"], params["after_id"] = db.stamp(after[0]), after[1]
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    text = f"{_SELECT}{where} ORDER BY created_at, id LIMIT :limit"
    statement = _PAGES.get(text)
    if statement is None:
        statement = sql(text)
        if len(_PAGES) < 1024:
            _PAGES[text] = statement
    return [decode(db, row) for row in await session.fetch(statement, params)]


async def live_ids(session: Session, ids: Sequence[str]) -> set[str]:
    """Those of `ids` that exist and are not being deleted."""
    if not ids:
        return set()
    statement = _LIVE_IDS.get(len(ids))
    if statement is None:
        marks = ", ".join(f":i{n}" for n in range(len(ids)))
        statement = _LIVE_IDS.setdefault(
            len(ids),
            sql(
                f"SELECT id FROM clusters WHERE id IN ({marks}) "  # noqa: S608
                "AND deletion_requested_at IS NULL"
            ),
        )
    rows = await session.fetch(statement, {f"i{n}": i for n, i in enumerate(ids)})
    return {str(row[0]) for row in rows}


async def for_update_many(session: Session, ids: Sequence[str]) -> dict[str, ClusterRow]:
    """The rows of these ids (in this unit of work's transaction), by id."""
    await session.lock()
    found: dict[str, ClusterRow] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join(f":i{n}" for n in range(len(chunk)))
        lock = "" if session.db.sqlite else " ORDER BY id FOR UPDATE"
        statement = sql(f"{_SELECT} WHERE id IN ({marks}){lock}")
        for row in await session.fetch(statement, {f"i{n}": i for n, i in enumerate(chunk)}):
            cluster = decode(session.db, row)
            found[cluster.id] = cluster
    return found


async def insert(session: Session, row: ClusterRow) -> None:
    await session.execute(_INSERT, encode(session.db, row))


async def update(session: Session, row: ClusterRow) -> None:
    values = encode(session.db, row)
    values.pop("created_at")
    await session.execute(_UPDATE, values)


async def update_status(session: Session, row: ClusterRow) -> None:
    """Deferred to the commit (the projector writes many rows: one round trip for all)."""
    db = session.db
    session.defer(
        _UPDATE_STATUS,
        {
            "id": row.id,
            "phase": row.phase,
            "observed_generation": row.observed_generation,
            "status_reason": row.status_reason,
            "status_message": row.status_message,
            "conditions": db.dumps(row.conditions),
            "endpoint": None if row.endpoint is None else db.dumps(row.endpoint),
            "status_sequence": row.status_sequence,
        },
    )


async def remove(session: Session, cluster_id: str) -> None:
    await session.execute(_DELETE, {"id": cluster_id})
