"""Cursor paging, written once for every collection: opaque cursors over (createdAt, id).

A repository asks for `limit + 1` rows after the cursor (`keyset` builds the condition for an
ORM query, `KEYSET_SQL` for a lean one) and `page_of` turns them into the page and its `next`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar
from urllib.parse import urlencode

from fastapi import Query, Request
from pydantic import BaseModel
from sqlalchemy import ColumnElement, and_, or_

from services.api.kit.problems import FieldError, InvalidInput

T = TypeVar("T")
R = TypeVar("R")

MAX_LIMIT = 500


class Page(BaseModel, Generic[T]):
    """A page of a collection; `next` is the cursor of the following page, or null at the end."""

    items: list[T]
    next: str | None = None


class Cursor(BaseModel):
    """The position after the last item of a page: items are ordered by (createdAt, id)."""

    created_at: datetime
    id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), self.id]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            padded = text + "=" * (-len(text) % 4)
            created, ident = json.loads(base64.urlsafe_b64decode(padded))
            return cls(created_at=datetime.fromisoformat(created), id=str(ident))
        except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
            raise InvalidInput(
                "invalid cursor", errors=[FieldError(field="cursor", message="not a valid cursor")]
            ) from None


After = tuple[datetime, str]
"""(createdAt, id) of the last item already seen."""


def after(cursor: str | None) -> After | None:
    """The position a `cursor` query parameter names (422 naming `cursor` if it is not one)."""
    if not cursor:
        return None
    position = Cursor.decode(cursor)
    return position.created_at, position.id


def keyset(
    created: Any, ident: Any, position: After | None, *, descending: bool = False
) -> ColumnElement[bool] | None:
    """The ORM condition for rows after `position` in (created, id) order."""
    if position is None:
        return None
    moment, key = position
    if descending:
        return or_(created < moment, and_(created == moment, ident < key))
    return or_(created > moment, and_(created == moment, ident > key))


KEYSET_SQL = "(created_at > :after_at OR (created_at = :after_at AND id > :after_id))"
"""The lean condition for rows after (:after_at, :after_id), ascending."""


def page_of(
    rows: Sequence[R],
    limit: int,
    to_item: Callable[[R], T],
    position: Callable[[R], After],
) -> Page[T]:
    """The page of `limit + 1` fetched rows: the first `limit` as items, `next` if one more."""
    following = None
    if len(rows) > limit:
        moment, key = position(rows[limit - 1])
        following = Cursor(created_at=moment, id=key).encode()
    return Page(items=[to_item(row) for row in rows[:limit]], next=following)


def by_created(row: Any) -> After:
    """The (created_at, id) of an ORM row."""
    return row.created_at, row.id


LimitQuery = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description=f"Items per page, at most {MAX_LIMIT}.")
]
CursorQuery = Annotated[
    str | None, Query(description="The `next` cursor of the previous page.", max_length=512)
]


def link_header(request: Request, next_cursor: str | None) -> dict[str, str]:
    """The `Link: <…>; rel="next"` header of a page (same query, the next cursor), or none."""
    if not next_cursor:
        return {}
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    query.append(("cursor", next_cursor))
    return {"Link": f'<{request.url.path}?{urlencode(query)}>; rel="next"'}
