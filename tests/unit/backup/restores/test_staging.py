"""Signed snapshot URLs (HMAC-SHA256, expiring), etcd's sha256 trailer on a staged file, and the
sweep of expired staged snapshots. Pure: no server, no clock but the one passed in."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from services.backup import errors
from services.backup.restores.etcd import check_trailer
from services.backup.restores.staging import StagedSnapshots, sign, token_valid

KEY = b"k" * 32


def test_a_token_opens_its_own_restore_until_it_expires() -> None:
    token = sign(KEY, "r1", 1000)
    assert token_valid(KEY, "r1", "1000", token, now=999.0)
    assert not token_valid(KEY, "r1", "1000", token, now=1000.0)  # expired at `expires`
    assert not token_valid(KEY, "r1", "1000", token, now=5000.0)


@pytest.mark.parametrize(
    ("restore_id", "expires", "key"),
    [("r2", "1000", KEY), ("r1", "1001", KEY), ("r1", "1000", b"x" * 32), ("r1", "1e3", KEY)],
    ids=["other-restore", "extended-expiry", "other-key", "not-an-int"],
)
def test_a_token_does_not_open_anything_else(restore_id: str, expires: str, key: bytes) -> None:
    token = sign(KEY, "r1", 1000)
    assert not token_valid(key, restore_id, expires, token, now=0.0)


def test_tokens_are_hmac_sha256_hex() -> None:
    token = sign(KEY, "r1", 1000)
    assert len(token) == 64 and int(token, 16) >= 0
    assert token != sign(KEY, "r1", 1001) != sign(KEY, "r2", 1000)
    assert not token_valid(KEY, "r1", "1000", "", now=0.0)
    assert not token_valid(KEY, "r1", "1000", token.upper(), now=0.0)


def test_each_staging_server_has_its_own_random_key(tmp_path: Path) -> None:
    one, two = StagedSnapshots(tmp_path / "a"), StagedSnapshots(tmp_path / "b")
    assert len(one.key) == 32 and one.key != two.key
    url = one.url_for("r1", 1000)
    assert url.startswith("http://127.0.0.1:0/v1/restores/r1/snapshot?expires=1000&token=")
    assert (
        StagedSnapshots(tmp_path, public_url="http://backup.nest:8091/")
        .url_for("r1", 5)
        .startswith("http://backup.nest:8091/v1/restores/r1/snapshot?")
    )
    with pytest.raises(ValueError, match="restore id"):
        one.path_for("../escape")


def snapshot_bytes(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_the_trailer_check_accepts_a_snapshot_and_refuses_any_change(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.db"
    body = os.urandom(3 << 20)  # more than one read block
    path.write_bytes(snapshot_bytes(body))
    check_trailer(path)
    for position in (0, len(body) // 2, len(body) - 1, len(body) + 5):
        data = bytearray(snapshot_bytes(body))
        data[position] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(errors.SnapshotCorrupt):
            check_trailer(path)
    path.write_bytes(body)  # no trailer at all
    with pytest.raises(errors.SnapshotCorrupt):
        check_trailer(path)
    path.write_bytes(b"short")
    with pytest.raises(errors.SnapshotCorrupt, match="too short"):
        check_trailer(path)


def test_the_sweep_removes_only_expired_staged_snapshots(tmp_path: Path) -> None:
    now = 10_000.0
    staged = StagedSnapshots(tmp_path, wall_clock=lambda: now)
    for name, age in (("old", 3601), ("fresh", 10)):
        path = staged.path_for(name)
        path.parent.mkdir()
        path.write_bytes(b"x")
        os.utime(path.parent, (now - age, now - age))
    assert staged.sweep() == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]


async def test_a_restarted_service_serves_what_is_still_valid_with_the_same_urls(
    tmp_path: Path,
) -> None:
    import time

    import httpx

    from libs.common.secrets import derived_key
    from libs.common.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", secrets_key="s" * 40)
    key = derived_key(settings, "restore-url")
    assert key == derived_key(settings, "restore-url") != derived_key(settings, "other")
    before = StagedSnapshots(tmp_path / "restores", key=key)
    for name, age in (("old", 7200), ("fresh", 5)):
        path = before.path_for(name)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"snapshot " + name.encode())
        os.utime(path.parent, (time.time() - age, time.time() - age))
    expires = int(time.time()) + 600
    url = before.url_for("fresh", expires)

    after = StagedSnapshots(tmp_path / "restores", key=key)  # the next process
    await after.start()
    try:
        assert sorted(p.name for p in (tmp_path / "restores").iterdir()) == ["fresh"]
        assert after._runner is not None  # serving at once: a Job may be fetching
        port_url = url.replace(":0/", f":{after.port}/")
        async with httpx.AsyncClient() as client:
            response = await client.get(port_url)
            assert response.status_code == 200 and response.content == b"snapshot fresh"
            forged = port_url.replace(f"expires={expires}", f"expires={expires + 1}")
            assert (await client.get(forged)).status_code == 403
    finally:
        await after.stop()
