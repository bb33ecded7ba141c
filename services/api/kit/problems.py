"""RFC 9457 problem details: the one error shape of the API, and the exceptions mapped to it."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from libs.common.logging import correlation_id

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class FieldError(BaseModel):
    """One invalid input field."""

    field: str = Field(description="Dotted path of the field, e.g. spec.network.podCidr.")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    correlation_id: str | None = Field(default=None, alias="correlationId")
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """An error the API answers with a problem document. Subclasses fix status and title."""

    status = 500
    title = "Internal Server Error"
    kind = "internal"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, *, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors


class NotFound(ProblemError):
    status = 404
    title = "Not Found"
    kind = "not-found"


class Conflict(ProblemError):
    status = 409
    title = "Conflict"
    kind = "conflict"


class PreconditionFailed(ProblemError):
    status = 412
    title = "Precondition Failed"
    kind = "precondition-failed"


class InvalidInput(ProblemError):
    status = 422
    title = "Unprocessable Content"
    kind = "validation"


class Unavailable(ProblemError):
    status = 503
    title = "Service Unavailable"
    kind = "unavailable"


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """FastAPI/Pydantic error location to a dotted path, without the `body`/`query` prefix."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


def errors_from_pydantic(errors: Sequence[Any], prefix: tuple[str, ...] = ()) -> list[FieldError]:
    result = []
    for error in errors:
        message = str(error.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        result.append(
            FieldError(field=field_path((*prefix, *error.get("loc", ()))), message=message)
        )
    return result


def invalid_from_validation(exc: ValidationError, prefix: tuple[str, ...] = ()) -> InvalidInput:
    errors = errors_from_pydantic(exc.errors(), prefix)
    summary = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return InvalidInput(f"invalid input: {summary}", errors=errors)


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str | None,
    *,
    kind: str = "about:blank",
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    problem = Problem(
        type=kind if kind == "about:blank" else f"https://nest.io/problems/{kind}",
        title=title,
        status=status,
        detail=detail,
        instance=str(request.url.path),
        correlationId=correlation_id.get(),
        errors=errors,
    )
    return JSONResponse(
        problem.model_dump(by_alias=True, exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


async def send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    kind: str,
    instance: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    errors: list[dict[str, str]] | None = None,
) -> None:
    problem: dict[str, Any] = {
        "type": f"https://nest.io/problems/{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if cid := correlation_id.get():
        problem["correlationId"] = cid
    if errors:
        problem["errors"] = errors
    body = json.dumps(problem).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    """Map every error the app can raise to a problem document (never an HTML page)."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(
            request,
            exc.status,
            exc.title,
            exc.detail,
            kind=exc.kind,
            errors=exc.errors,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = errors_from_pydantic(exc.errors())
        summary = "; ".join(f"{e.field}: {e.message}" for e in errors)
        return problem_response(
            request,
            422,
            "Unprocessable Content",
            f"invalid input: {summary}",
            kind="validation",
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(
            request, exc.status_code, _title(exc.status_code), str(exc.detail), headers=headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            request,
            500,
            "Internal Server Error",
            "an unexpected error occurred; see the logs",
            kind="internal",
        )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
