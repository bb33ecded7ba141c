"""Base model for every payload that crosses a boundary: camelCase on the wire, strict input."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """A Pydantic model whose JSON names are camelCase and which refuses unknown fields.

    Python code uses snake_case attribute names; `model_dump(by_alias=True)` gives the wire shape.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
    )

    def wire(self) -> dict[str, object]:
        """The JSON-ready wire representation (camelCase keys)."""
        return self.model_dump(mode="json", by_alias=True)
