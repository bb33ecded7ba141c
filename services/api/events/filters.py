"""Which events a reader sees: type patterns (exact or prefix), and the visibility rule by scope.

Shared by the event history, the SSE stream and webhook subscriptions, so one pattern means the
same thing everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.api.auth.schemas import Scope

ADMIN_ONLY_TYPE_PREFIXES: tuple[str, ...] = (
    "io.nest.token.",
    "io.nest.webhook.",
    "io.nest.audit.",
    "io.nest.auth.",
)
"""Event domains about credentials and who did what: only admin tokens see them."""

_PATTERN = re.compile(r"^[A-Za-z0-9._-]*\*?$")
MAX_PATTERN_LENGTH = 255


def hidden_type_prefixes(scope: Scope) -> tuple[str, ...]:
    """The visibility rule: type prefixes a token of this scope must not see.

    Viewer and operator tokens see every event (clusters, backups, updates, …) except the
    admin-only domains; admin tokens see everything. Every reader (list, stream) applies this.
    """
    return () if scope.allows(Scope.ADMIN) else ADMIN_ONLY_TYPE_PREFIXES


def visible_to(event_type: str, scope: Scope) -> bool:
    return not event_type.startswith(hidden_type_prefixes(scope))


@dataclass(frozen=True)
class TypePattern:
    """`io.nest.cluster.deleted.v1` matches that type; `io.nest.cluster.` (or `…cluster.*`, or
    `*`) matches every type starting so."""

    text: str
    prefix: str | None

    def matches(self, event_type: str) -> bool:
        if self.prefix is not None:
            return event_type.startswith(self.prefix)
        return event_type == self.text


def parse_pattern(text: str) -> TypePattern:
    """Raises ValueError with a message a user can act on."""
    if not text or len(text) > MAX_PATTERN_LENGTH or not _PATTERN.match(text):
        raise ValueError(
            "must be an event type (io.nest.cluster.deleted.v1) or a prefix ending in '.' or '*'"
        )
    if text.endswith("*"):
        return TypePattern(text, text[:-1])
    if text.endswith("."):
        return TypePattern(text, text)
    return TypePattern(text, None)


def parse_patterns(texts: Iterable[str]) -> tuple[TypePattern, ...]:
    return tuple(parse_pattern(t) for t in texts)


def matches_any(event_type: str, patterns: Sequence[TypePattern]) -> bool:
    """No patterns means every type."""
    return not patterns or any(p.matches(event_type) for p in patterns)


@dataclass(frozen=True)
class EventFilter:
    """What one reader asked for, and what its scope allows."""

    patterns: tuple[TypePattern, ...] = ()
    subject: str | None = None
    hidden_prefixes: tuple[str, ...] = ()

    @classmethod
    def for_reader(
        cls, scope: Scope, types: Iterable[str] = (), subject: str | None = None
    ) -> EventFilter:
        return cls(parse_patterns(types), subject or None, hidden_type_prefixes(scope))

    def accepts(self, event_type: str, subject: str | None) -> bool:
        if self.hidden_prefixes and event_type.startswith(self.hidden_prefixes):
            return False
        if self.subject is not None and subject != self.subject:
            return False
        return matches_any(event_type, self.patterns)
