"""ETags and If-Match, for resources that carry a `resourceVersion`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header

from services.api.kit.problems import PreconditionFailed

IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        max_length=1024,
        description="Apply only if the resource's ETag is one of these (or `*`); else 412.",
    ),
]


def etag(version: int | str) -> str:
    return f'"{version}"'


def check_if_match(if_match: str | None, version: int | str, what: str) -> None:
    """If-Match: a list of ETags or `*`; 412 naming `what` when the resource changed since."""
    if if_match is None:
        return
    wanted = {tag.strip().removeprefix("W/") for tag in if_match.split(",")}
    if "*" in wanted or etag(version) in wanted:
        return
    raise PreconditionFailed(f"{what} has changed (ETag {etag(version)}); read it again and retry")
