"""Settings: the NEST_ names of the operating contract, defaults, and errors naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from libs.common.settings import SettingsError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("NEST_DATA_DIR", "NEST_DATABASE_URL", "NEST_NATS_URL", "NEST_API_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NEST_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.api_url == "http://127.0.0.1:8080"
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path / 'nest.db'}"
    assert settings.nats_url is None


def test_postgres_url_gets_the_async_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEST_DATABASE_URL", "postgresql://nest@db/nest")
    assert load_settings().resolved_database_url == "postgresql+asyncpg://nest@db/nest"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NEST_API_PORT", "eighty"),
        ("NEST_API_PORT", "70000"),
        ("NEST_ADMIN_TOKEN", "too-short"),
        ("NEST_DATABASE_URL", "mysql://x"),
        ("NEST_LOG_LEVEL", "chatty"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert name in str(err.value)


def test_cli_refuses_to_start_with_a_bad_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "api"],
        env={"NEST_API_PORT": "nope", "NEST_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2
    assert "NEST_API_PORT" in result.stderr
    assert "Traceback" not in result.stderr
