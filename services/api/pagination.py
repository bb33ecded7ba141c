"""Cursor pagination shared by every collection: opaque cursors over (createdAt, id)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Generic, TypeVar
from urllib.parse import urlencode

from fastapi import Query, Request
from pydantic import BaseModel

from services.api.problems import FieldError, InvalidInput

T = TypeVar("T")

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
