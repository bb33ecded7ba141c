"""A small HTTP client for the Foundry API, used by the CLI; turns problem documents into errors."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import httpx

API_PREFIX = "/api/v1"


class ApiError(Exception):
    """The API answered with an error (a problem document) or did not answer. `hints` say what
    to do about it, when the CLI knows."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        errors: list[Any] | None = None,
        hints: list[str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.errors = errors or []
        self.hints = hints or []


class ApiUnreachable(ApiError):
    """No answer: nothing listens at the URL, or it did not answer in time."""


CONFIG_FILE = (
    Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "nest" / "config.json"
)


def data_dir() -> Path:
    return Path(os.environ.get("NEST_DATA_DIR", Path.home() / ".nest"))


def find_token() -> str | None:
    """NEST_TOKEN, else the config file (`nest login`), else the local admin-token file."""
    if token := os.environ.get("NEST_TOKEN"):
        return token
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(CONFIG_FILE.read_text()).get("token")
        if saved:
            return str(saved)
    with contextlib.suppress(OSError):
        return (data_dir() / "admin-token").read_text().strip() or None
    return None


def save_token(token: str) -> Path:
    CONFIG_FILE.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(CONFIG_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"token": token}, handle)
    return CONFIG_FILE


def api_root(url: str) -> str:
    """The server's root URL from what a user may give: `host:port`, `http://host:port`, or the
    API's own URL as `nest up` prints it (`http://host:port/api/v1`), with or without a slash."""
    root = url.strip().rstrip("/")
    if "://" not in root:
        root = "http://" + root
    if root.endswith(API_PREFIX):
        root = root[: -len(API_PREFIX)].rstrip("/")
    return root


class ApiClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        origin: str | None = None,
    ) -> None:
        """`origin` names where `base_url` came from (`--api-url`, `NEST_API_URL`; None: the
        settings), for the advice when nothing answers there."""
        self.root = api_root(base_url)
        self.origin = origin
        self.timeout = timeout
        headers = {"Accept": "application/json"}
        token = token or find_token()
        self.has_token = bool(token)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=self.root + API_PREFIX, headers=headers, timeout=timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiUnreachable(
                f"the Nest API at {self.root} did not answer within {self.timeout:.0f} s"
            ) from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.is_success:
            return response.json() if response.content else None
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            raise ApiError(
                f"HTTP {response.status_code} from {response.url}: {response.text[:200]}",
                status=response.status_code,
                hints=[f"is {self.root} the Nest API?"],
            ) from None
        message = str(problem.get("detail") or problem.get("title") or response.status_code)
        hints = self._hints(response.status_code)
        if response.status_code == 404 and message == "Not Found":  # no such route
            message = f"Not Found: {response.url}"
            hints = [f"is {self.root} where the Nest API runs? `nest up` prints its URL"]
        raise ApiError(
            message, status=response.status_code, errors=problem.get("errors"), hints=hints
        )

    def _unreachable(self, exc: httpx.HTTPError) -> ApiUnreachable:
        where = {
            None: "or set NEST_API_URL (or --api-url) to where it runs",
            "NEST_API_URL": f"or correct NEST_API_URL (it is {os.environ.get('NEST_API_URL')})",
            "--api-url": "or correct --api-url",
        }.get(self.origin, "")
        if isinstance(exc, httpx.ConnectError) and "refused" in str(exc).lower():
            return ApiUnreachable(
                f"the Nest API is not running at {self.root} (connection refused)",
                hints=[f"start it with `nest up` (it runs in the foreground), {where}"],
            )
        return ApiUnreachable(
            f"cannot reach the Nest API at {self.root}: {exc}",
            hints=[f"is Nest running there? Start it with `nest up`, {where}"],
        )

    def _hints(self, status: int) -> list[str]:
        if status != 401:
            return []
        if not self.has_token:
            return [
                "no token: set NEST_TOKEN, save one with `nest login`, or use the admin token "
                f"`nest up` wrote to {data_dir() / 'admin-token'} (set NEST_DATA_DIR if Nest "
                "runs with another data dir)"
            ]
        return ["the token was refused: save a valid one with `nest login`, or set NEST_TOKEN"]
