"""Client-side encryption of backup artifacts: AES-256-GCM in 1 MiB chunks, streamed.

Format (all integers big-endian)::

    header  = b"NESTENC\\x01" | chunk_size:u32 | len(key_id):u8 | key_id | salt:32 | commitment:32
    chunk i = AES-256-GCM(subkey, nonce=i:u96, plaintext[i], aad=header | i:u64 | final:u8)

- Each artifact draws a random 256-bit salt; HKDF-SHA256(key, salt) gives a per-artifact subkey
  and a key commitment. The subkey is never reused across artifacts, so a counter nonce is
  safe; the commitment tells "wrong key" apart from "corrupt data" before any chunk is read.
- The chunk index and a final-chunk flag are authenticated, so reordering, dropping or
  truncating chunks (even at a chunk boundary) fails authentication. Every chunk but the last
  holds exactly `chunk_size` plaintext bytes; the last holds fewer (possibly zero), so the
  reader knows which chunk claims to be final without looking ahead.
- The header is authenticated with every chunk, so the key id and chunk size cannot be swapped.

Memory is bounded by one chunk on each side. Keys come from a `Keyring`: new artifacts use the
active key; any key still in the ring decrypts (rotation = add a key, make it active, keep the
old one until its backups have aged out).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.backup import errors

MAGIC = b"NESTENC\x01"
CHUNK_SIZE = 1 << 20
"""Plaintext bytes per chunk."""
TAG_SIZE = 16
SALT_SIZE = 32
COMMITMENT_SIZE = 32
KEY_SIZE = 32
_INFO = b"nest-backup-aes256gcm-v1"
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Keyring:
    """Encryption keys by id and the id new backups use. `repr` never shows key material."""

    keys: Mapping[str, bytes] = field(repr=False)
    active: str

    def __post_init__(self) -> None:
        for key_id, key in self.keys.items():
            if not KEY_ID_PATTERN.match(key_id):
                raise ValueError(f"key id {key_id!r} must match {KEY_ID_PATTERN.pattern}")
            if len(key) != KEY_SIZE:
                raise ValueError(f"key {key_id!r} must be {KEY_SIZE} bytes, got {len(key)}")
        if self.active not in self.keys:
            raise ValueError(f"active key id {self.active!r} is not in the keyring")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @classmethod
    def from_encoded(cls, encoded: Mapping[str, str], active: str) -> Keyring:
        """Keys given as base64 (standard or urlsafe) or 64 hex characters, as in settings."""
        keys: dict[str, bytes] = {}
        for key_id, text in encoded.items():
            keys[key_id] = decode_key(key_id, text)
        return cls(keys, active)

    def key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise errors.UnknownKey(
                f"artifact was encrypted with key id {key_id!r}, which is not in the keyring "
                f"(known: {', '.join(sorted(self.keys)) or 'none'})"
            ) from None


def decode_key(key_id: str, text: str) -> bytes:
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        padded = text + "=" * (-len(text) % 4)
        altchars = b"-_" if ("-" in text or "_" in text) else None
        key = base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"key {key_id!r} is neither base64 nor hex") from None
    if len(key) != KEY_SIZE:
        raise ValueError(f"key {key_id!r} must decode to {KEY_SIZE} bytes, got {len(key)}")
    return key


def generate_key() -> str:
    """A fresh random key, base64-encoded (for `nest` to print into a settings file)."""
    return base64.b64encode(secrets.token_bytes(KEY_SIZE)).decode()


def _derive(key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_INFO).derive(key)
    return material[:32], material[32:]


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


async def encrypt(
    source: AsyncIterable[bytes], keyring: Keyring, *, chunk_size: int = CHUNK_SIZE
) -> AsyncIterator[bytes]:
    """Encrypt a stream with the keyring's active key; yields the header, then each chunk."""
    key_id = keyring.active.encode()
    salt = secrets.token_bytes(SALT_SIZE)
    subkey, commitment = _derive(keyring.key(keyring.active), salt)
    header = MAGIC + struct.pack(">IB", chunk_size, len(key_id)) + key_id + salt + commitment
    cipher = AESGCM(subkey)
    yield header
    index = 0
    buffer = bytearray()
    async for piece in source:
        buffer += piece
        while len(buffer) > chunk_size:
            # Strictly more than a chunk buffered: this chunk is certainly not the last one.
            yield cipher.encrypt(
                _nonce(index), bytes(buffer[:chunk_size]), _aad(header, index, False)
            )
            del buffer[:chunk_size]
            index += 1
    if len(buffer) == chunk_size:
        yield cipher.encrypt(_nonce(index), bytes(buffer), _aad(header, index, False))
        buffer.clear()
        index += 1
    yield cipher.encrypt(_nonce(index), bytes(buffer), _aad(header, index, True))


class _Reader:
    """Exact-size reads from an async byte stream, buffering at most one request's worth."""

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        self._iterator = aiter(source)
        self._buffer = bytearray()
        self._eof = False

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes; fewer only at the end of the stream."""
        while len(self._buffer) < size and not self._eof:
            try:
                self._buffer += await anext(self._iterator)
            except StopAsyncIteration:
                self._eof = True
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


def key_id_of(header: bytes) -> str | None:
    """The key id in an artifact's first bytes, or None if they are not an encrypted artifact."""
    if not header.startswith(MAGIC) or len(header) < len(MAGIC) + 5:
        return None
    length = header[len(MAGIC) + 4]
    raw = header[len(MAGIC) + 5 : len(MAGIC) + 5 + length]
    return raw.decode("ascii", "replace") if len(raw) == length else None


async def decrypt(source: AsyncIterable[bytes], keyring: Keyring) -> AsyncIterator[bytes]:
    """Decrypt a stream made by `encrypt`; raises UnknownKey, WrongKey or CiphertextCorrupt."""
    reader = _Reader(source)
    fixed = await reader.read(len(MAGIC) + 5)
    if len(fixed) < len(MAGIC) + 5 or not fixed.startswith(MAGIC):
        raise errors.CiphertextCorrupt("not a Nest encrypted artifact (bad magic or header)")
    chunk_size, id_length = struct.unpack(">IB", fixed[len(MAGIC) :])
    if not 0 < chunk_size <= 64 << 20:
        raise errors.CiphertextCorrupt(f"implausible chunk size {chunk_size} in header")
    rest = await reader.read(id_length + SALT_SIZE + COMMITMENT_SIZE)
    if len(rest) < id_length + SALT_SIZE + COMMITMENT_SIZE:
        raise errors.CiphertextCorrupt("artifact truncated inside its header")
    try:
        key_id = rest[:id_length].decode("ascii")
    except UnicodeDecodeError:
        raise errors.CiphertextCorrupt("key id in header is not ASCII") from None
    salt = rest[id_length : id_length + SALT_SIZE]
    commitment = rest[id_length + SALT_SIZE :]
    header = fixed + rest
    subkey, expected = _derive(keyring.key(key_id), salt)
    if not hmac.compare_digest(commitment, expected):
        raise errors.WrongKey(
            f"the key under id {key_id!r} is not the key this artifact was encrypted with "
            "(or the header is corrupt)"
        )
    cipher = AESGCM(subkey)
    index = 0
    while True:
        sealed = await reader.read(chunk_size + TAG_SIZE)
        final = len(sealed) < chunk_size + TAG_SIZE
        if len(sealed) < TAG_SIZE:
            raise errors.CiphertextCorrupt(
                f"artifact truncated: chunk {index} is missing or shorter than its tag"
            )
        try:
            yield cipher.decrypt(_nonce(index), sealed, _aad(header, index, final))
        except InvalidTag:
            raise errors.CiphertextCorrupt(
                f"chunk {index} failed authentication: the artifact was altered or truncated"
            ) from None
        if final:
            break
        index += 1
    if await reader.read(1):
        raise errors.CiphertextCorrupt("unexpected bytes after the final chunk")


def fingerprint(key: bytes) -> str:
    """A short non-secret identifier of a key (for logs and `nest` output), never the key."""
    return hashlib.sha256(b"nest-key-fingerprint" + key).hexdigest()[:16]
