"""The OpenAPI document as SDK generators need it: honest error media types, stable ids.

FastAPI documents validation errors as `application/json` HTTPValidationError; Nest answers every
error as RFC 9457 `application/problem+json`. This rewrites every 4xx/5xx response to that,
adds the responses every authenticated operation can give (401, 403, 429, 413), and checks that
every operation has an operationId, a tag and a summary.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.api.kit.problems import PROBLEM_JSON, Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
COMMON = {
    "401": "No valid token (missing, unknown, expired or revoked).",
    "403": "The token's scope does not allow this.",
    "429": "Rate limit exceeded; retry after `Retry-After` seconds.",
}
WITH_BODY = {"413": "The request body is larger than 1 MiB."}
OWN_ERROR_BODIES = {"getReadiness"}
"""Operations whose error answers are not problem documents (the readiness report)."""


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": PROBLEM_REF}}}


def build(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    for schema in schemas["Problem"].pop("$defs", {}).items():
        schemas.setdefault(schema[0], schema[1])
    for methods in document.get("paths", {}).values():
        for method, operation in methods.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            missing = [k for k in ("operationId", "tags", "summary") if not operation.get(k)]
            if missing:
                raise RuntimeError(f"{method.upper()} operation lacks {missing}")
            responses = operation["responses"]
            for code, response in list(responses.items()):
                if code[0] in "45" and operation.get("operationId") not in OWN_ERROR_BODIES:
                    responses[code] = _problem(response.get("description") or "Error")
            extra = dict(COMMON) if operation.get("security") else {}
            if "requestBody" in operation:
                extra.update(WITH_BODY)
                extra.setdefault("422", "Invalid input; `errors` names each field.")
            for code, description in extra.items():
                responses.setdefault(code, _problem(description))
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
