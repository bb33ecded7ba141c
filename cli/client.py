"""A small HTTP client for the Foundry API, used by the CLI; turns problem documents into errors."""

from __future__ import annotations

import os
from typing import Any

import httpx


class ApiError(Exception):
    """The API answered with an error (a problem document) or did not answer."""

    def __init__(self, message: str, *, status: int | None = None, errors: list[Any] | None = None):
        super().__init__(message)
        self.status = status
        self.errors = errors or []


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Accept": "application/json"}
        token = token or os.environ.get("NEST_TOKEN")
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
