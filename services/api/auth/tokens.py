"""API token format: a recognisable prefix, ~178 bits of randomness and a checksum.

`nest_` + 30 base62 characters of randomness + 6 base62 characters of CRC32, like GitHub's
`ghp_` tokens: secret scanners can spot a leaked token by its shape, and a typo is detected
without a database lookup. Only the SHA-256 of a token is stored.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

PREFIX = "nest_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS = 30  # 30 * log2(62) ~= 178.6 bits
CHECKSUM_CHARS = 6
TOKEN_LENGTH = len(PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_CHARS)


def generate() -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return f"{PREFIX}{body}{checksum(body)}"


def well_formed(token: str) -> bool:
    """True for a Nest-format token whose checksum matches."""
    if len(token) != TOKEN_LENGTH or not token.startswith(PREFIX):
        return False
    body = token[len(PREFIX) : len(PREFIX) + RANDOM_CHARS]
    if any(c not in ALPHABET for c in body):
        return False
    return checksum(body) == token[-CHECKSUM_CHARS:]


def digest(token: str) -> str:
    """What is stored: the token has ~178 bits of entropy, so a fast hash is enough."""
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    """The first characters, safe to show in lists so a user can tell tokens apart."""
    return token[: len(PREFIX) + 4]
