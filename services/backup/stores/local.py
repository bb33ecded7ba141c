"""The local directory store, the embedded default: each object a file under a root directory.

Writes go to a temp file, fsync, rename, fsync the directory, so an object is there whole or
not at all; `cleanup_uploads` removes temp files an interrupted write left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from services.backup import errors
from services.backup.stores.objects import READ_CHUNK, TEMP_MARKER, ObjectInfo, validate_key

T = TypeVar("T")


async def _disk(what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking file operation in a thread; map OSError to the store error types."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except PermissionError as exc:
        raise errors.AccessDenied(f"{what}: permission denied ({exc.strerror})") from None
    except OSError as exc:
        raise errors.StoreError(f"{what}: {exc.strerror or exc}") from None


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalStore:
    """A directory tree; each object a file. Writes go to a temp file, fsync, rename, fsync dir."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync

    @property
    def description(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        final = self._path(key)
        await _disk(f"create {final.parent}", final.parent.mkdir, parents=True, exist_ok=True)
        temp = final.with_name(f".{final.name}{TEMP_MARKER}{secrets.token_hex(6)}")
        handle = await _disk(f"create {temp}", temp.open, "xb")
        written = 0
        try:
            try:
                # The source's own exceptions pass through; only disk errors are translated.
                async for chunk in chunks:
                    await _disk(f"write {temp}", handle.write, chunk)
                    written += len(chunk)
                await _disk(f"write {temp}", handle.flush)
                if self.fsync:
                    await _disk(f"fsync {temp}", os.fsync, handle.fileno())
            finally:
                await asyncio.to_thread(handle.close)
            await _disk(f"rename {temp}", os.replace, temp, final)
            if self.fsync:
                await _disk(f"fsync {final.parent}", _fsync_dir, final.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return written

    async def get(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise errors.ObjectNotFound(f"no object {key!r} in {self.description}") from None
        try:
            while chunk := await asyncio.to_thread(handle.read, READ_CHUNK):
                yield chunk
        finally:
            handle.close()

    async def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            stat = await asyncio.to_thread(path.stat)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    async def exists(self, key: str) -> bool:
        return await self.head(key) is not None

    def _walk(self, prefix: str, *, temp: bool) -> list[tuple[str, os.stat_result]]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        found: list[tuple[str, os.stat_result]] = []
        if not base.is_dir():
            return found
        for directory, _, files in os.walk(base):
            for name in files:
                is_temp = name.startswith(".") and TEMP_MARKER in name
                if is_temp != temp:
                    continue
                path = Path(directory) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((key, path.stat()))
        return found

    async def list(self, prefix: str) -> list[ObjectInfo]:
        entries = await asyncio.to_thread(self._walk, prefix, temp=False)
        return sorted(
            (ObjectInfo(k, s.st_size, datetime.fromtimestamp(s.st_mtime, UTC)) for k, s in entries),
            key=lambda info: info.key,
        )

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
        # Drop directories left empty, up to the root, so listings stay small.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                await asyncio.to_thread(parent.rmdir)
            except OSError:
                break
            parent = parent.parent

    async def cleanup_uploads(self, older_than: datetime) -> int:
        removed = 0
        for key, stat in await asyncio.to_thread(self._walk, "", temp=True):
            if datetime.fromtimestamp(stat.st_mtime, UTC) < older_than:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread((self.root / key).unlink)
                    removed += 1
        return removed

    async def close(self) -> None:
        return None
