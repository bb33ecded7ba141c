"""Sealing of secrets Nest must store and use again (S3 secret access keys): API and backup service.

AES-256-GCM with a key derived (HKDF-SHA256) from `NEST_SECRETS_KEY`, or, when that is unset,
from a random key generated at the first start into `<data dir>/secrets.key` (mode 0600). Each
sealed value is bound to what it belongs to (the associated data, e.g. `backup-location:<id>`),
so a sealed value copied onto another row does not open.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from libs.common.settings import Settings

KEY_FILE = "secrets.key"
VERSION = "v1"
NONCE_BYTES = 12


class SealedSecretError(Exception):
    """A sealed value does not open with this key (another key, or a tampered value)."""


class Sealer:
    """Seal and open short secrets under one derived key."""

    def __init__(self, master: bytes) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"nest-api-secrets-v1"
        ).derive(master)
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(<key>)"

    def seal(self, plaintext: str, *, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{VERSION}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, sealed: str, *, context: str) -> str:
        version, _, encoded = sealed.partition(":")
        if version != VERSION:
            raise SealedSecretError(f"unknown sealed-secret format {version!r}")
        try:
            raw = base64.urlsafe_b64decode(encoded)
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (InvalidTag, ValueError):
            raise SealedSecretError(
                "a stored secret does not open: NEST_SECRETS_KEY or secrets.key changed"
            ) from None
        return plain.decode()


def load_key(data_dir: Path) -> bytes:
    """The key in `<data dir>/secrets.key`, created (0600, never overwritten) if absent."""
    path = data_dir / KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole to a temp file, then linked into place: a replica starting at the same
        # time either wins or reads the complete key the other wrote, never a partial one.
        temp = data_dir / f".{KEY_FILE}.{secrets.token_hex(6)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            temp.unlink(missing_ok=True)
    key = base64.b64decode(path.read_text().strip())
    if len(key) < 16:
        raise SealedSecretError(
            f"{path} does not hold a key; remove it only if no secret is stored"
        )
    return key


def sealer_from_settings(settings: Settings) -> Sealer:
    if settings.secrets_key:
        return Sealer(settings.secrets_key.encode())
    return Sealer(load_key(settings.data_dir))


def derived_key(settings: Settings, purpose: str) -> bytes:
    """A 32-byte key for `purpose` (e.g. signing restore URLs), derived from the same master as
    the sealer: stable across restarts and shared by every replica given the same key."""
    master = settings.secrets_key.encode() if settings.secrets_key else load_key(settings.data_dir)
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"nest-{purpose}-v1".encode()
    ).derive(master)
