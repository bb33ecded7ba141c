"""Chunked AES-256-GCM: round trips, and every tampering a stored artifact could suffer."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.backup import errors
from services.backup.stores import crypto
from services.backup.stores.streams import collect, iterate

CHUNK = 64


def keyring(active: str = "k1", **keys: bytes) -> crypto.Keyring:
    return crypto.Keyring(keys or {active: secrets.token_bytes(32)}, active)


async def seal(data: bytes, ring: crypto.Keyring, piece: int = 7) -> bytes:
    return await collect(crypto.encrypt(iterate(data, piece), ring, chunk_size=CHUNK))


async def open_(sealed: bytes, ring: crypto.Keyring, piece: int = 13) -> bytes:
    return await collect(crypto.decrypt(iterate(sealed, piece), ring))


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
async def test_round_trip_at_chunk_boundaries(size: int) -> None:
    ring = keyring()
    data = secrets.token_bytes(size)
    sealed = await seal(data, ring)
    assert await open_(sealed, ring) == data
    assert len(data) < 16 or data[:16] not in sealed


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5 * CHUNK), piece=st.integers(1, 3 * CHUNK))
async def test_round_trip_any_input_any_read_size(data: bytes, piece: int) -> None:
    ring = keyring()
    assert await open_(await seal(data, ring, piece), ring, piece) == data


async def test_header_carries_the_active_key_id() -> None:
    ring = keyring("2026-11", **{"2026-11": secrets.token_bytes(32)})
    sealed = await seal(b"hello", ring)
    assert crypto.key_id_of(sealed[:100]) == "2026-11"


async def test_every_single_bit_flip_is_detected() -> None:
    ring = keyring()
    sealed = await seal(secrets.token_bytes(2 * CHUNK + 10), ring)
    for position in range(0, len(sealed), 3):
        damaged = bytearray(sealed)
        damaged[position] ^= 0x01
        with pytest.raises(errors.CryptoError):
            await open_(bytes(damaged), ring)


async def test_truncation_at_a_chunk_boundary_is_detected() -> None:
    ring = keyring()
    sealed = await seal(secrets.token_bytes(3 * CHUNK + 5), ring)
    header = len(sealed) - 4 * crypto.TAG_SIZE - 3 * CHUNK - 5
    for chunks in range(4):
        cut = header + chunks * (CHUNK + crypto.TAG_SIZE)
        with pytest.raises(errors.CiphertextCorrupt, match=r"truncated|authentication"):
            await open_(sealed[:cut], ring)


async def test_truncation_inside_a_chunk_and_appended_bytes_are_detected() -> None:
    ring = keyring()
    sealed = await seal(secrets.token_bytes(2 * CHUNK), ring)
    with pytest.raises(errors.CiphertextCorrupt):
        await open_(sealed[:-3], ring)
    with pytest.raises(errors.CiphertextCorrupt):
        await open_(sealed + b"x", ring)


async def test_reordered_chunks_are_detected() -> None:
    ring = keyring()
    sealed = await seal(secrets.token_bytes(3 * CHUNK), ring)
    size = CHUNK + crypto.TAG_SIZE
    header = len(sealed) - 3 * size - crypto.TAG_SIZE
    body = sealed[header:]
    swapped = sealed[:header] + body[size : 2 * size] + body[:size] + body[2 * size :]
    with pytest.raises(errors.CiphertextCorrupt, match="chunk 0"):
        await open_(swapped, ring)


async def test_wrong_key_under_the_same_id_is_a_clear_error() -> None:
    sealed = await seal(b"secret data", keyring("prod", prod=secrets.token_bytes(32)))
    with pytest.raises(errors.WrongKey, match="'prod'"):
        await open_(sealed, keyring("prod", prod=secrets.token_bytes(32)))


async def test_unknown_key_id_names_the_id_and_the_known_ones() -> None:
    sealed = await seal(b"secret data", keyring("old", old=secrets.token_bytes(32)))
    with pytest.raises(errors.UnknownKey, match=r"'old'.*known: new"):
        await open_(sealed, keyring("new", new=secrets.token_bytes(32)))


async def test_rotation_new_backups_use_the_active_key_old_ones_still_decrypt() -> None:
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    before = await seal(b"made before rotation", crypto.Keyring({"a": old_key}, "a"))
    rotated = crypto.Keyring({"a": old_key, "b": new_key}, "b")
    after = await seal(b"made after rotation", rotated)
    assert crypto.key_id_of(after) == "b"
    assert await open_(before, rotated) == b"made before rotation"
    assert await open_(after, rotated) == b"made after rotation"


async def test_plaintext_is_refused_as_not_encrypted() -> None:
    with pytest.raises(errors.CiphertextCorrupt, match="not a Nest encrypted artifact"):
        await open_(b"SQLite format 3\0" + b"\0" * 100, keyring())


def test_keyring_never_shows_key_material() -> None:
    key = secrets.token_bytes(32)
    ring = crypto.Keyring({"k": key}, "k")
    assert key.hex() not in repr(ring)
    assert repr(key) not in repr(ring)


def test_keyring_refuses_bad_keys_and_ids() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.Keyring({"k": b"short"}, "k")
    with pytest.raises(ValueError, match="not in the keyring"):
        crypto.Keyring({"k": bytes(32)}, "other")
    with pytest.raises(ValueError, match="key id"):
        crypto.Keyring({"bad id!": bytes(32)}, "bad id!")


def test_keys_decode_from_base64_urlsafe_and_hex() -> None:
    key = secrets.token_bytes(32)
    import base64

    for text in (
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="),
        key.hex(),
    ):
        assert crypto.Keyring.from_encoded({"k": text}, "k").keys["k"] == key
    with pytest.raises(ValueError, match="neither base64 nor hex"):
        crypto.decode_key("k", "not a key!")
    assert len(crypto.decode_key("k", crypto.generate_key())) == 32
