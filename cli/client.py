"""A small HTTP client for the Foundry API, used by the CLI; turns problem documents into errors."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import httpx


class ApiError(Exception):
    """The API answered with an error (a problem document) or did not answer."""

    def __init__(self, message: str, *, status: int | None = None, errors: list[Any] | None = None):
        super().__init__(message)
        self.status = status
        self.errors = errors or []


CONFIG_FILE = (
    Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "nest" / "config.json"
)


def find_token() -> str | None:
    """NEST_TOKEN, else the config file (`nest login`), else the local admin-token file."""
    if token := os.environ.get("NEST_TOKEN"):
        return token
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(CONFIG_FILE.read_text()).get("token")
        if saved:
            return str(saved)
    data_dir = Path(os.environ.get("NEST_DATA_DIR", Path.home() / ".nest"))
    with contextlib.suppress(OSError):
        return (data_dir / "admin-token").read_text().strip() or None
    return None


def save_token(token: str) -> Path:
    CONFIG_FILE.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(CONFIG_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"token": token}, handle)
    return CONFIG_FILE


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Accept": "application/json"}
        token = token or find_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the Nest API at {self.http.base_url}: {exc}") from None
        if response.is_success:
            return response.json() if response.content else None
        try:
            problem = response.json()
        except ValueError:
            raise ApiError(
                f"HTTP {response.status_code}: {response.text[:200]}", status=response.status_code
            ) from None
        message = problem.get("detail") or problem.get("title") or f"HTTP {response.status_code}"
        raise ApiError(message, status=response.status_code, errors=problem.get("errors"))
