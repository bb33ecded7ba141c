"""The local directory store (the embedded default) and the probe on it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.backup import errors
from services.backup.stores.local import LocalStore
from services.backup.stores.probe import probe
from services.backup.stores.streams import collect, iterate


async def test_put_get_list_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    data = os.urandom(3 << 20)
    assert await store.put("t/a/blob", iterate(data, 100_000)) == len(data)
    await store.put("t/b/other", iterate(b"x"))
    assert await collect(store.get("t/a/blob"), limit=4 << 20) == data
    assert [i.key for i in await store.list("t/")] == ["t/a/blob", "t/b/other"]
    assert [i.key for i in await store.list("t/a")] == ["t/a/blob"]
    info = await store.head("t/a/blob")
    assert info is not None
    assert info.size == len(data)
    await store.delete("t/a/blob")
    await store.delete("t/a/blob")  # absent is fine
    assert not await store.exists("t/a/blob")
    assert not (tmp_path / "store" / "t" / "a").exists()  # empty folders go too
    with pytest.raises(errors.ObjectNotFound):
        await collect(store.get("t/a/blob"))


async def test_failed_put_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def broken() -> AsyncIterator[bytes]:
        yield b"partial data"
        raise ConnectionError("source died")

    with pytest.raises(ConnectionError):
        await store.put("t/x/artifact", broken())
    assert await store.list("") == []
    assert [p.name for p in (tmp_path / "t" / "x").iterdir()] == []


async def test_temp_files_of_a_crashed_put_are_hidden_then_cleaned(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "t").mkdir()
    leftover = tmp_path / "t" / ".artifact.part-0123456789ab"
    leftover.write_bytes(b"half")
    assert await store.list("") == []
    assert await store.cleanup_uploads(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert leftover.exists()  # within the grace period: maybe still being written
    assert await store.cleanup_uploads(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert not leftover.exists()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/.x.part-1"])
async def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        await LocalStore(tmp_path).put(key, iterate(b"x"))


async def test_probe_passes_on_a_writable_directory(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await probe(store)
    assert await store.list("") == []


async def test_disk_errors_are_store_errors(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits; a file where a directory should be fails for anyone.
        (tmp_path / "blocked").write_bytes(b"")
        store = LocalStore(tmp_path / "blocked")
        with pytest.raises(errors.StoreError, match="create"):
            await store.put("t/x/artifact", iterate(b"data"))
        with pytest.raises(errors.StoreError):
            await probe(store)
        return
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(errors.AccessDenied, match="permission denied"):
        await LocalStore(tmp_path / "ro").put("t/x/artifact", iterate(b"data"))
