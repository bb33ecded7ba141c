"""Idempotency-Key handling for POST: the first response is stored and replayed for retries.

A retry with the same key and the same request gets the original response and causes no second
effect; the same key with another request is refused (422); a retry while the first attempt is
still running gets 409. Keys are scoped per credential and expire after 24 hours. Responses
that invite a retry (429, 5xx) are not stored, so the retry really runs.

Stored responses can hold secrets (a new token, a webhook's signing secret), so they are
encrypted (AES-256-GCM) with a key derived from the caller's own credential: only a retry
with that credential can read them, never someone who reads the database.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.exc import IntegrityError

from services.api.idempotency import repository
from services.api.kit.db import Database
from services.api.models import IdempotencyRecord, utcnow

TTL = timedelta(hours=24)
ABANDONED_AFTER = timedelta(minutes=2)
"""An unfinished claim this old belongs to a request whose process died: it may be retried."""
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")
REPLAYED_HEADERS = ("content-type", "location", "etag")


class KeyInvalid(Exception):
    """The Idempotency-Key header is not 1-255 printable ASCII characters."""


class KeyReused(Exception):
    """The key was used before with a different request."""


class KeyInFlight(Exception):
    """The first request with this key has not finished yet."""


@dataclass(frozen=True)
class Stored:
    status: int
    body: bytes
    headers: dict[str, str]


def owner_of(authorization: str | None) -> str:
    return hashlib.sha256((authorization or "").encode()).hexdigest()


def _cipher(authorization: str | None) -> AESGCM:
    key = hashlib.sha256(b"nest-idempotency-response\0" + (authorization or "").encode()).digest()
    return AESGCM(key)


def seal(authorization: str | None, body: bytes) -> str:
    nonce = os.urandom(12)
    return base64.b64encode(nonce + _cipher(authorization).encrypt(nonce, body, None)).decode()


def unseal(authorization: str | None, sealed: str) -> bytes:
    raw = base64.b64decode(sealed)
    return _cipher(authorization).decrypt(raw[:12], raw[12:], None)


def request_hash(method: str, path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), b"\0", path.encode(), b"\0", body):
        digest.update(part)
    return digest.hexdigest()


def storable(status: int) -> bool:
    return status < 500 and status != 429


async def begin(
    db: Database,
    *,
    authorization: str | None,
    key: str,
    method: str,
    path: str,
    body_hash: str,
) -> Stored | None:
    """Claim the key for this request, or return the stored response to replay."""
    if not KEY_PATTERN.match(key):
        raise KeyInvalid(key)
    owner = owner_of(authorization)
    now = utcnow()
    async with db.orm_sessions() as session:
        existing = await repository.get(session, owner, key)
        abandoned = (
            existing is not None
            and existing.status is None
            and existing.created_at <= now - ABANDONED_AFTER
        )
        if existing is not None and (existing.expires_at <= now or abandoned):
            await repository.remove(session, owner, key)
            await session.commit()
            existing = None
        if existing is not None:
            if existing.body_hash != body_hash:
                raise KeyReused(key)
            if existing.status is None:
                raise KeyInFlight(key)
            headers: dict[str, Any] = existing.response_headers or {}
            return Stored(
                existing.status,
                unseal(authorization, existing.response_body or ""),
                {k: str(v) for k, v in headers.items()},
            )
        repository.add(
            session,
            IdempotencyRecord(
                owner=owner,
                key=key,
                method=method,
                path=path[:512],
                body_hash=body_hash,
                status=None,
                created_at=now,
                expires_at=now + TTL,
            ),
        )
        try:
            await session.commit()
        except IntegrityError:
            raise KeyInFlight(key) from None
    return None


async def finish(
    db: Database,
    *,
    authorization: str | None,
    key: str,
    status: int,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """Store the response for replay, or release the key when the response invites a retry."""
    owner = owner_of(authorization)
    async with db.orm_sessions() as session:
        if storable(status):
            kept = {k: v for k, v in headers.items() if k in REPLAYED_HEADERS}
            await repository.complete(session, owner, key, status, seal(authorization, body), kept)
        else:
            await repository.remove(session, owner, key)
        await session.commit()


async def purge(db: Database) -> int:
    async with db.orm_sessions() as session:
        count = await repository.purge_expired(session, utcnow())
        await session.commit()
    return count
