"""JSON merge patch (RFC 7386) as every PATCH endpoint applies it, and the metadata rules.

Every resource is written as `{name, labels, spec}`: the name cannot change (a patch may repeat
it), labels merge (null removes one) and are validated as a whole.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from libs.common.contract.cluster import validate_labels
from services.api.kit.problems import FieldError, InvalidInput, invalid_from_validation

M = TypeVar("M", bound=BaseModel)


def merge_patch(target: Any, patch: Any) -> Any:
    """Objects merge recursively, null removes a member, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def check_name_unchanged(current: str, given: str | None) -> None:
    """A patch may repeat the name, never change it (422 naming `name`)."""
    if given is not None and given != current:
        raise InvalidInput(
            "name cannot be changed",
            errors=[FieldError(field="name", message="cannot be changed after creation")],
        )


def patched_labels(
    current: dict[str, str], patch: dict[str, str | None] | None
) -> dict[str, str] | None:
    """The labels after the patch, or None when they do not change (422 naming `labels`)."""
    if patch is None:
        return None
    labels: dict[str, str] = merge_patch(dict(current), patch)
    try:
        validate_labels(labels)
    except ValueError as exc:
        raise InvalidInput(
            f"invalid input: labels: {exc}", errors=[FieldError(field="labels", message=str(exc))]
        ) from None
    return None if labels == current else labels


def patched_spec(model: type[M], current: dict[str, Any], patch: dict[str, Any]) -> M:
    """The current spec with the patch merged in, validated as a whole (422 naming `spec.…`)."""
    try:
        return model.model_validate(merge_patch(current, patch))
    except ValidationError as exc:
        raise invalid_from_validation(exc, prefix=("spec",)) from None
