"""Re-chunking a stream into upload parts: exact sizes, every byte once, one buffer per part."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.backup.stores.streams import file_size, rechunk, rechunk_files


async def stream(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def collect_files(pieces: list[bytes], size: int) -> list[bytes]:
    found = []
    async for part in rechunk_files(stream(pieces), size):
        assert part.tell() == 0
        found.append(part.read())
        assert file_size(part) == len(found[-1])
    return found


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), max_size=20),
    size=st.integers(min_value=1, max_value=17),
)
async def test_parts_have_the_size_and_keep_every_byte_in_order(
    sizes: list[int], size: int
) -> None:
    pieces = [os.urandom(n) for n in sizes]
    parts = await collect_files(pieces, size)
    assert b"".join(parts) == b"".join(pieces)
    assert all(len(p) == size for p in parts[:-1])
    assert all(0 < len(p) <= size for p in parts)
    assert parts == [p async for p in rechunk(stream(pieces), size)]


async def test_an_empty_stream_has_no_part_and_a_bad_size_is_refused() -> None:
    assert await collect_files([b"", b""], 4) == []
    with pytest.raises(ValueError):
        await collect_files([b"x"], 0)


async def test_a_part_owns_its_buffer_so_exporting_it_does_not_copy() -> None:
    async for part in rechunk_files(stream([b"a" * 10, b"b" * 10]), 8):
        # BytesIO(bytes) would share and copy on getbuffer(); ours can be resized in place
        # only if nothing else holds its buffer, which shows it is its own copy.
        part.seek(0, 2)
        part.write(b"!")
        assert part.getbuffer()[-1:] == b"!"
