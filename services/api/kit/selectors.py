"""Kubernetes-style label selectors: `team=payments,env!=dev,tier in (a,b),gpu,!legacy`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from libs.common.contract.cluster import validate_labels
from services.api.kit.problems import FieldError, InvalidInput

Operator = Literal["=", "!=", "in", "notin", "exists", "!exists"]

_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ = re.compile(r"^\s*([^\s!=]+)\s*(==|=|!=)\s*([^\s,]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()


def _split(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _invalid(text: str, why: str) -> InvalidInput:
    return InvalidInput(
        f"invalid labelSelector {text!r}: {why}",
        errors=[FieldError(field="labelSelector", message=why)],
    )


def parse(text: str) -> list[Requirement]:
    """Parse a selector; raise InvalidInput naming `labelSelector` on a syntax error."""
    requirements: list[Requirement] = []
    for part in _split(text):
        if match := _SET.match(part):
            key, op, raw = match.groups()
            values = tuple(v.strip() for v in raw.split(",") if v.strip())
            if not values:
                raise _invalid(text, f"'{key} {op} ()' needs at least one value")
            requirement = Requirement(key, op, values)  # type: ignore[arg-type]
        elif match := _EQ.match(part):
            key, op, value = match.groups()
            requirement = Requirement(key, "!=" if op == "!=" else "=", (value,))
        elif match := _EXISTS.match(part):
            negate, key = match.groups()
            requirement = Requirement(key, "!exists" if negate else "exists")
        else:
            raise _invalid(text, f"cannot parse {part.strip()!r}")
        try:
            for value in requirement.values or ("",):
                validate_labels({requirement.key: value})
        except ValueError as exc:
            raise _invalid(text, str(exc)) from None
        requirements.append(requirement)
    return requirements
