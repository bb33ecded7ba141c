"""Async byte streams in bounded memory: re-chunking and measuring (size + sha256) on the way.

Every backup flows source -> measure -> (encrypt) -> measure -> store as async iterators of
bytes; nothing here holds more than one block at a time.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterable, AsyncIterator


async def rechunk_files(source: AsyncIterable[bytes], size: int) -> AsyncIterator[io.BytesIO]:
    """Yield in-memory files of exactly `size` bytes (the last may be shorter, never empty),
    positioned at 0, each the ONLY copy of its bytes.

    For uploads: botocore wraps a `bytes` body in `io.BytesIO(body)`, which shares the bytes
    until aiohttp asks for its buffer, and then copies it, so a part in flight would be held
    twice. A file we filled ourselves owns its buffer, is passed on as is, and is sent from
    that buffer. Each file is allocated once at its full size (no growth copies); only the
    chunk that straddles a boundary is sliced, through a memoryview (no copy)."""
    if size <= 0:
        raise ValueError("size must be positive")
    part: io.BytesIO | None = None
    filled = 0
    async for chunk in source:
        view = memoryview(chunk)
        while view:
            if part is None:
                part = io.BytesIO()
                part.seek(size - 1)
                part.write(b"\0")  # one allocation of the whole part
                part.seek(0)
            take = min(size - filled, len(view))
            part.write(view[:take])
            filled += take
            view = view[take:]
            if filled == size:
                part.seek(0)
                ready, part, filled = part, None, 0
                yield ready
                del ready
    if part is not None and filled:
        part.truncate(filled)
        part.seek(0)
        yield part


def file_size(part: io.BytesIO) -> int:
    """Bytes in an in-memory file (without copying them)."""
    with part.getbuffer() as view:
        return view.nbytes


async def rechunk(source: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    """Yield blocks of exactly `size` bytes (the last may be shorter, never empty).

    Pieces are collected in a list and joined once per block, so a block costs one copy
    (a growing bytearray would cost up to three at 8 MiB each)."""
    if size <= 0:
        raise ValueError("size must be positive")
    pieces: list[bytes] = []
    held = 0
    async for chunk in source:
        if not chunk:
            continue
        pieces.append(chunk)
        held += len(chunk)
        while held >= size:
            joined = b"".join(pieces)
            pieces.clear()
            yield joined[:size]
            rest = joined[size:]
            del joined
            pieces = [rest] if rest else []
            held = len(rest)
    if pieces:
        yield b"".join(pieces)


class Measured:
    """Wraps a stream; after it is consumed, `size` and `sha256` describe every byte passed."""

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        self._source = source
        self._hash = hashlib.sha256()
        self.size = 0
        self.finished = False

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pass()

    async def _pass(self) -> AsyncIterator[bytes]:
        async for chunk in self._source:
            self._hash.update(chunk)
            self.size += len(chunk)
            yield chunk
        self.finished = True


async def iterate(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    """A bytes value as a stream (tests, probes, manifests)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def collect(source: AsyncIterable[bytes], limit: int = 16 << 20) -> bytes:
    """Read a small stream fully; refuses more than `limit` bytes (manifests, probes)."""
    buffer = bytearray()
    async for chunk in source:
        buffer += chunk
        if len(buffer) > limit:
            raise ValueError(f"stream larger than {limit} bytes")
    return bytes(buffer)
