"""The interface every backup store speaks (`ObjectStore`), and the rule for object keys.

Streaming `put` from an async byte iterator in bounded memory, `get` as an async byte stream,
`list` by prefix, `head`, `exists`, `delete`, and `cleanup_uploads` for what an interrupted `put`
may leave behind (a temp file, an unfinished multipart upload). A `put` either stores the whole
object or nothing under its key. Implementations: `local.LocalStore` (a directory, the embedded
default) and `s3.S3Store`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

READ_CHUNK = 1 << 20
"""Bytes per chunk when a store streams an object back."""

TEMP_MARKER = ".part-"
"""Local temp files are named `.<name>.part-<random>`; listing skips them, cleanup removes them."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the store's prefix), size and last change."""

    key: str
    size: int
    modified: datetime


class ObjectStore(Protocol):
    """Where backup artifacts live. Keys are `/`-separated, relative to the store's own prefix."""

    @property
    def description(self) -> str:
        """A human-readable location without secrets, safe to log."""

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Store the stream under `key` (all or nothing); return the number of bytes stored.
        Store failures raise StoreError subtypes; a failing source's exception passes through."""

    def get(self, key: str) -> AsyncIterator[bytes]:
        """Stream the object's bytes; raises `errors.ObjectNotFound` when iterated if absent."""

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if there is no such object."""

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every complete object whose key starts with `prefix`, sorted by key."""

    async def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    async def cleanup_uploads(self, older_than: datetime) -> int:
        """Remove leftovers of interrupted puts started before `older_than`; return how many."""

    async def close(self) -> None:
        """Release connections."""


def validate_key(key: str) -> str:
    """Refuse keys that could escape the store's root or collide with temp files."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    if any(p.startswith(".") and TEMP_MARKER in p for p in parts):
        raise ValueError(f"invalid object key {key!r} (reserved temp-file name)")
    return key
