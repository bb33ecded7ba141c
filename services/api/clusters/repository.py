"""Every query on the clusters table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import Cluster
from services.api.selectors import Requirement


async def get(
    session: AsyncSession, cluster_id: str, *, for_update: bool = False
) -> Cluster | None:
    query = select(Cluster).where(Cluster.id == cluster_id)
    if for_update:
        query = query.with_for_update()
    result: Cluster | None = await session.scalar(query)
    return result


async def get_by_name(session: AsyncSession, name: str) -> Cluster | None:
    result: Cluster | None = await session.scalar(select(Cluster).where(Cluster.name == name))
    return result


def _label_condition(requirement: Requirement) -> ColumnElement[bool]:
    """One requirement as SQL over the JSON labels column (SQLite json_extract, PG ->>)."""
    value = Cluster.labels[requirement.key].as_string()
    condition: ColumnElement[bool]
    match requirement.operator:
        case "=":
            condition = value == requirement.values[0]
        case "!=":
            condition = or_(value.is_(None), value != requirement.values[0])
        case "in":
            condition = value.in_(requirement.values)
        case "notin":
            condition = or_(value.is_(None), value.not_in(requirement.values))
        case "exists":
            condition = value.is_not(None)
        case _:
            condition = value.is_(None)
    return condition


async def list_page(
    session: AsyncSession,
    *,
    limit: int,
    after: tuple[datetime, str] | None,
    selector: Sequence[Requirement] = (),
    phase: str | None = None,
) -> Sequence[Cluster]:
    """Clusters ordered by (created_at, id), starting after the cursor; one extra to see if more."""
    query = select(Cluster).order_by(Cluster.created_at, Cluster.id).limit(limit + 1)
    for requirement in selector:
        query = query.where(_label_condition(requirement))
    if phase is not None:
        query = query.where(Cluster.phase == phase)
    if after is not None:
        created, ident = after
        query = query.where(
            or_(
                Cluster.created_at > created,
                and_(Cluster.created_at == created, Cluster.id > ident),
            )
        )
    return (await session.scalars(query)).all()


def add(session: AsyncSession, cluster: Cluster) -> None:
    session.add(cluster)


async def remove(session: AsyncSession, cluster_id: str) -> None:
    await session.execute(delete(Cluster).where(Cluster.id == cluster_id))
