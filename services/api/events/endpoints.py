"""HTTP routes for /api/v1/events: the event history and its live Server-Sent Events stream."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse

from services.api.auth.dependencies import ViewerDep
from services.api.auth.service import authenticate
from services.api.events import service
from services.api.events.schemas import EventPage
from services.api.kit.errors import errors
from services.api.kit.paging import CursorQuery, LimitQuery, link_header
from services.api.kit.problems import FieldError, InvalidInput, Problem, ProblemError
from services.api.kit.unit_of_work import SessionDep

router = APIRouter(prefix="/events", tags=["events"])

TypeQuery = Annotated[
    list[str] | None,
    Query(
        alias="type",
        description=(
            "Event type, exact (`io.nest.cluster.deleted.v1`) or a prefix ending in `.` or `*` "
            "(`io.nest.cluster.`); repeat for several."
        ),
    ),
]
SubjectQuery = Annotated[
    str | None, Query(description="Only events about this resource id.", max_length=255)
]
ERRORS = errors()


@router.get(
    "",
    response_model=EventPage,
    operation_id="listEvents",
    summary="List recorded events",
    responses=ERRORS,
)
async def list_events(
    request: Request,
    session: SessionDep,
    principal: ViewerDep,
    type_: TypeQuery = None,
    subject: SubjectQuery = None,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> JSONResponse:
    """CloudEvents Nest recorded, oldest first. Types a token may not see are left out."""
    where = service.reader_filter(principal.scope, type_, subject)
    page = await service.list_events(session, where, limit=limit, cursor=cursor)
    return JSONResponse(page, headers=link_header(request, page.get("next")))


class NotAcceptable(ProblemError):
    status = 406
    title = "Not Acceptable"
    kind = "not-acceptable"


def _asks_for_event_stream(accept: str | None) -> bool:
    types = {part.split(";", 1)[0].strip().lower() for part in (accept or "").split(",")}
    return "text/event-stream" in types


def _position(value: str, field: str) -> int:
    try:
        position = int(value)
    except ValueError:
        position = -1
    if position < 0:
        raise InvalidInput(
            f"invalid input: {field}: must be a stream position (a non-negative integer)",
            errors=[FieldError(field=field, message="must be a non-negative integer")],
        )
    return position


@router.get(
    "/stream",
    operation_id="streamEvents",
    summary="Stream events (Server-Sent Events)",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": (
                "`id:` is the event's position, `event:` its type, `data:` the CloudEvent. "
                "A comment line is sent when idle."
            ),
        },
        406: {"model": Problem, "description": "The request does not accept text/event-stream."},
        **ERRORS,
    },
)
async def stream_events(
    request: Request,
    principal: ViewerDep,
    type_: TypeQuery = None,
    subject: SubjectQuery = None,
    since: Annotated[
        str | None,
        Query(description="Replay events after this position (0: the whole history), then live."),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(description="Set by EventSource on reconnect; wins over `since`."),
    ] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Any:
    """Live events as they are recorded; resumable without gaps or duplicates.

    The request must accept `text/event-stream` explicitly (EventSource does), so a generic
    client never starts an endless download by accident.
    """
    if not _asks_for_event_stream(accept):
        raise NotAcceptable(
            "this endpoint streams text/event-stream; send Accept: text/event-stream"
        )
    where = service.reader_filter(principal.scope, type_, subject)
    after = None
    if last_event_id:
        after = _position(last_event_id, "Last-Event-ID")
    elif since is not None:
        after = _position(since, "since")
    token = request.headers.get("authorization", "").partition(" ")[2].strip()

    async def still_authorized() -> bool:
        # The token cache makes this cheap; a revoked token is seen within its few seconds.
        state = request.app.state
        return await authenticate(state.db, state.token_cache, token) is not None

    feed: service.EventFeed = request.app.state.events
    return await feed.stream(where, after, still_authorized)
