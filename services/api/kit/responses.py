"""Fast JSON responses for Pydantic models (the declared response_model still documents them).

FastAPI would dump a returned model to a dict, validate it again against the response model and
serialise that; our models are already validated, so we serialise once, in pydantic-core.
"""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response


class ModelResponse(Response):
    media_type = "application/json"

    def __init__(
        self, model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(
            content=model.model_dump_json(by_alias=True),
            status_code=status_code,
            headers=headers,
        )


def resource_response(
    model: BaseModel,
    status_code: int = 200,
    *,
    location: str | None = None,
    version: int | str | None = None,
) -> ModelResponse:
    """A resource with its `Location` (on create) and `ETag` (if it has a resourceVersion)."""
    headers: dict[str, str] = {}
    if version is not None:
        headers["ETag"] = f'"{version}"'
    if location is not None:
        headers["Location"] = location
    return ModelResponse(model, status_code, headers=headers or None)
