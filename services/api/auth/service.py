"""Token domain logic: create, list, revoke, authenticate (with a short cache), bootstrap."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from services.api.auth import repository, tokens
from services.api.auth.schemas import (
    Scope,
    TokenCreate,
    TokenCreated,
    TokenRead,
    TokenSpec,
    TokenStatus,
)
from services.api.kit import paging
from services.api.kit.db import Database, Session
from services.api.kit.paging import Page
from services.api.kit.problems import NotFound
from services.api.models import ApiToken, utcnow

log = logging.getLogger(__name__)

INITIAL_ADMIN_FLAG = "initial-admin-token"
CACHE_SECONDS = 5.0
"""How long a verified token is trusted without a DB read; bounds revocation delay elsewhere."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and scope."""

    token_id: str
    name: str
    scope: Scope


def to_read(token: ApiToken) -> TokenRead:
    now = utcnow()
    return TokenRead(
        id=token.id,
        name=token.name,
        labels=dict(token.labels),
        spec=TokenSpec(
            scope=Scope(token.scope),
            expires_in_days=max(1, (token.expires_at - token.created_at).days),
        ),
        created_at=token.created_at,
        updated_at=token.updated_at,
        created_by=token.created_by,
        status=TokenStatus(
            expires_at=token.expires_at,
            revoked_at=token.revoked_at,
            active=token.revoked_at is None and token.expires_at > now,
            prefix=token.display_prefix,
        ),
    )


class TokenCache:
    """Verified tokens by hash, each trusted for CACHE_SECONDS. Revocation evicts locally."""

    def __init__(self, ttl: float = CACHE_SECONDS, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal | None, float]] = {}

    def get(self, token_hash: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(token_hash)
        if entry is None:
            return False, None
        cached_at, principal, expires = entry
        now = time.monotonic()
        if now - cached_at > self.ttl or now > expires:
            del self._entries[token_hash]
            return False, None
        return True, principal

    def put(self, token_hash: str, principal: Principal | None, expires_in: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        now = time.monotonic()
        self._entries[token_hash] = (now, principal, now + max(expires_in, 0.0))

    def evict_token(self, token_id: str) -> None:
        for key, (_, principal, _) in list(self._entries.items()):
            if principal is not None and principal.token_id == token_id:
                del self._entries[key]


async def authenticate(db: Database, cache: TokenCache, token: str) -> Principal | None:
    """The principal for a bearer token, or None if unknown, expired or revoked."""
    token_hash = tokens.digest(token)
    hit, principal = cache.get(token_hash)
    if hit:
        return principal
    async with db.session() as session:
        row = await repository.by_hash(session, token_hash)
    now = utcnow()
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        cache.put(token_hash, None, CACHE_SECONDS)
        return None
    principal = Principal(token_id=row.id, name=row.name, scope=Scope(row.scope))
    cache.put(token_hash, principal, (row.expires_at - now).total_seconds())
    return principal


def _new_row(
    name: str, scope: Scope, days: int, secret: str, created_by: str | None, labels: dict[str, str]
) -> ApiToken:
    now = utcnow()
    return ApiToken(
        id=str(uuid.uuid4()),
        name=name,
        labels=labels,
        scope=scope.value,
        token_hash=tokens.digest(secret),
        display_prefix=tokens.display_prefix(secret),
        created_at=now,
        updated_at=now,
        expires_at=now + timedelta(days=days),
        revoked_at=None,
        created_by=created_by,
    )


async def create(session: Session, body: TokenCreate, creator: Principal) -> TokenCreated:
    secret = tokens.generate()
    row = _new_row(
        body.name, body.spec.scope, body.spec.expires_in_days, secret, creator.token_id, body.labels
    )
    orm = await session.orm()
    repository.add(orm, row)
    await orm.flush()
    log.info("token created", extra={"tokenId": row.id, "scope": row.scope})
    return TokenCreated(**to_read(row).model_dump(), token=secret)


def _not_found(token_id: str) -> NotFound:
    return NotFound(
        f"token {token_id!r} not found by id (token names need not be unique); "
        "GET /api/v1/tokens lists them"
    )


async def get(session: Session, token_id: str) -> TokenRead:
    row = await repository.get(await session.orm(), token_id)
    if row is None:
        raise _not_found(token_id)
    return to_read(row)


async def list_tokens(session: Session, *, limit: int, cursor: str | None) -> Page[TokenRead]:
    rows = await repository.list_page(await session.orm(), limit=limit, after=paging.after(cursor))
    return paging.page_of(rows, limit, to_read, paging.by_created)


async def revoke(session: Session, token_id: str, cache: TokenCache) -> TokenRead:
    orm = await session.orm()
    row = await repository.get(orm, token_id)
    if row is None:
        raise _not_found(token_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        row.updated_at = row.revoked_at
        await orm.flush()
        log.info("token revoked", extra={"tokenId": row.id})
    # Evicted once the revocation has committed (until then the token still works).
    session.after_commit(lambda: cache.evict_token(row.id))
    return to_read(row)


async def bootstrap_admin(db: Database, data_dir: Path, given: str | None) -> Path | None:
    """At the first start, create the initial admin token; returns the file it was written to.

    With NEST_ADMIN_TOKEN set, that string becomes the token and nothing is written. Otherwise a
    token is generated and written to <data dir>/admin-token (mode 0600), never logged. A flag
    row makes this happen once per installation, also with several API replicas starting.
    """
    async with db.orm_sessions() as session:
        if await repository.flag_exists(session, INITIAL_ADMIN_FLAG):
            return None
        secret = given or tokens.generate()
        repository.add_flag(session, INITIAL_ADMIN_FLAG, utcnow())
        repository.add(session, _new_row("initial-admin", Scope.ADMIN, 365, secret, None, {}))
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            return None  # another replica did it first
    if given:
        log.info("initial admin token created from NEST_ADMIN_TOKEN")
        return None
    path = data_dir / "admin-token"
    _write_secret_file(path, secret)
    log.info("initial admin token written", extra={"path": str(path)})
    return path


def _write_secret_file(path: Path, secret: str) -> None:
    """Write a secret readable by the owner only (0600 from the moment the file exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret + "\n")
    os.chmod(path, 0o600)
