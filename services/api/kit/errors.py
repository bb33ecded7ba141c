"""The error responses an operation documents, written once for every resource.

`errors(not_found="No such cluster.", conflict="The name is taken.")` gives the `responses=`
table of a route: 401 and 403 always, and whichever of 404, 409, 412, 422, 503 it names.
(kit.openapi also adds 401/403/429/413 to every authenticated operation; naming them here
keeps each route's own table honest.)
"""

from __future__ import annotations

from typing import Any

from services.api.kit.problems import Problem

INVALID = "Invalid input; `errors` names each field."
IF_MATCH_FAILED = "If-Match did not match the current ETag."

Responses = dict[int | str, dict[str, Any]]


def errors(
    *,
    not_found: str | None = None,
    conflict: str | None = None,
    precondition: bool = False,
    invalid: str | None = INVALID,
    unavailable: str | None = None,
    auth: bool = True,
) -> Responses:
    table: Responses = {}
    if auth:
        table[401] = {"model": Problem, "description": "No valid token."}
        table[403] = {"model": Problem, "description": "The token's scope is too low."}
    for code, description in (
        (404, not_found),
        (409, conflict),
        (412, IF_MATCH_FAILED if precondition else None),
        (422, invalid),
        (503, unavailable),
    ):
        if description:
            table[code] = {"model": Problem, "description": description}
    return table
