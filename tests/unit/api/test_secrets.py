"""Sealing of stored secrets: round trip, binding to the owner, the generated key file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from libs.common.secrets import SealedSecretError, Sealer, load_key, sealer_from_settings
from libs.common.settings import Settings


def test_sealed_value_opens_only_for_its_owner_and_key() -> None:
    sealer = Sealer(b"k" * 32)
    sealed = sealer.seal("s3cret-value", context="backup-location:a")
    assert "s3cret-value" not in sealed
    assert sealer.open(sealed, context="backup-location:a") == "s3cret-value"
    with pytest.raises(SealedSecretError):
        sealer.open(sealed, context="backup-location:b")
    with pytest.raises(SealedSecretError):
        Sealer(b"x" * 32).open(sealed, context="backup-location:a")


def test_key_file_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_key(tmp_path / "data")
    path = tmp_path / "data" / "secrets.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(tmp_path / "data") == first
    assert len(first) == 32


def test_setting_wins_over_the_key_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, secrets_key="0123456789abcdef0123")
    sealed = sealer_from_settings(settings).seal("v", context="c")
    assert Sealer(b"0123456789abcdef0123").open(sealed, context="c") == "v"
    assert not (tmp_path / "secrets.key").exists()
    assert "0123456789abcdef0123" not in repr(settings)
