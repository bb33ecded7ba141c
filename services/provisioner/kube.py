"""The Kubernetes client of the provisioner: the only module that imports kubernetes_asyncio.

Everything else speaks plain dicts and REST paths (`manifests.resource_path`). A `KubeClient`
talks to one API server (the management cluster, or a tenant's) with kubernetes-asyncio's
`ApiClient` and raw REST calls, and turns failures into two kinds the reconciler can act on:

- `KubeUnavailable`: the server did not answer usefully (connection refused, timeout, 429,
  5xx) after the bounded retries with backoff done here; try again later.
- `KubeRejected`: the server refused the request for good (4xx other than 404/429); a spec or
  a Nest bug, retrying will not help.

A missing object is not an error: `get` answers None and `delete` answers False.

kubernetes_asyncio (and aiohttp under it) is imported when the first client is made, not with
this module: a provisioner without a management cluster never loads them (they were the largest
part of its memory).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.provisioner import names

if TYPE_CHECKING:
    import aiohttp
    from kubernetes_asyncio import client as kclient
    from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

_RESPONSE_TYPES = {200: "object", 201: "object", 202: "object"}
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class KubeError(Exception):
    """Base class of every failure talking to a Kubernetes API server."""


class KubeNotConfigured(KubeError):
    """No kubeconfig is set and the process does not run inside Kubernetes."""


class KubeUnavailable(KubeError):
    """The API server did not answer usefully (down, overloaded, timing out); retry later."""


class WatchExpired(KubeError):
    """The resourceVersion a watch asked for is too old (410 Gone): list again, then watch."""


class KubeRejected(KubeError):
    """The API server refused the request; retrying the same request cannot succeed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Retry:
    """How requests that fail transiently are retried before `KubeUnavailable` is raised."""

    attempts: int = 4
    """Tries per request, the first included."""
    base_delay: float = 0.2
    """Delay before the second try; doubled for each further one, with jitter."""
    max_delay: float = 2.0
    """Longest delay between two tries."""
    timeout: float = 10.0
    """Total time one try may take."""
    connect_timeout: float | None = None
    """Time connecting (TCP and the TLS handshake) may take of that; None: no bound of its
    own. A server that accepts and never speaks TLS costs this, not `timeout`."""

    def client_timeout(self) -> aiohttp.ClientTimeout:
        import aiohttp

        return aiohttp.ClientTimeout(total=self.timeout, sock_connect=self.connect_timeout)

    def delay(self, attempt: int) -> float:
        ceiling: float = min(self.max_delay, self.base_delay * 2.0**attempt)
        jitter: float = random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not secrets
        return ceiling / 2 + jitter


class KubeClient:
    """One API server, addressed with raw REST paths and JSON bodies."""

    def __init__(self, api: kclient.ApiClient, *, retry: Retry | None = None) -> None:
        self._api = api
        self.retry = retry or Retry()
        if not _proxy_settings_present():
            # kubernetes-asyncio always trusts the environment, which costs two thread hops per
            # request (netrc and proxy look-ups); with neither configured they find nothing.
            api.rest_client.pool_manager._trust_env = False

    @property
    def server(self) -> str:
        return str(self._api.configuration.host)

    @classmethod
    async def connect(cls, kubeconfig: Path | None, *, retry: Retry | None = None) -> KubeClient:
        """The management cluster: `kubeconfig` if set, else the in-cluster service account.

        Raises `KubeNotConfigured` when neither is available.
        """
        if kubeconfig is None and not _in_cluster():
            raise KubeNotConfigured(
                "no management cluster configured: set NEST_KUBECONFIG, or run Nest inside "
                "the management cluster"
            )
        from kubernetes_asyncio import client as kclient
        from kubernetes_asyncio import config as kconfig
        from kubernetes_asyncio.config.config_exception import ConfigException

        configuration = kclient.Configuration()
        try:
            if kubeconfig is not None:
                if not await asyncio.to_thread(kubeconfig.is_file):
                    raise KubeNotConfigured(f"NEST_KUBECONFIG {kubeconfig} is not a readable file")
                await kconfig.load_kube_config(
                    config_file=str(kubeconfig), client_configuration=configuration
                )
            else:
                kconfig.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
        except ConfigException as exc:
            if kubeconfig is None:
                raise KubeNotConfigured(
                    "no management cluster configured: set NEST_KUBECONFIG, or run Nest inside "
                    "the management cluster"
                ) from None
            raise KubeNotConfigured(f"NEST_KUBECONFIG {kubeconfig} is not usable: {exc}") from None
        return cls(kclient.ApiClient(configuration), retry=retry)

    @classmethod
    def with_client_certificate(
        cls,
        server: str,
        *,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        retry: Retry | None = None,
        connections: int = 4,
    ) -> KubeClient:
        """A client for `server` presenting a client certificate, trusting only `ca_pem`, with
        at most `connections` connections.

        The TLS material exists on disk only while the client's TLS context loads it.
        """
        from kubernetes_asyncio import client as kclient

        configuration = kclient.Configuration(host=server)
        configuration.connection_pool_maxsize = connections
        with tempfile.TemporaryDirectory(prefix="nest-tls-") as directory:
            paths = {}
            for name, data in (("ca.crt", ca_pem), ("tls.crt", cert_pem), ("tls.key", key_pem)):
                path = Path(directory) / name
                path.touch(mode=0o600)
                path.write_bytes(data)
                paths[name] = str(path)
            configuration.ssl_ca_cert = paths["ca.crt"]
            configuration.cert_file = paths["tls.crt"]
            configuration.key_file = paths["tls.key"]
            api = kclient.ApiClient(configuration)
        return cls(api, retry=retry)

    async def close(self) -> None:
        await self._api.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> Any:
        """One REST call, retried while the failure is transient; the decoded JSON answer."""
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        for attempt in range(self.retry.attempts):
            try:
                return await self._api.call_api(
                    path,
                    method,
                    query_params=list(query),
                    header_params={"Content-Type": content_type, "Accept": "application/json"},
                    body=body,
                    response_types_map=_RESPONSE_TYPES,
                    auth_settings=["BearerToken"],
                    _return_http_data_only=True,
                    _request_timeout=self.retry.client_timeout(),
                )
            except ApiException as exc:
                if exc.status not in _TRANSIENT_STATUSES:
                    raise _rejected(method, path, exc) from None
                problem = f"{method} {path} answered {exc.status} {_message(exc)}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = f"{method} {path} failed: {type(exc).__name__} {exc}".rstrip()
            if attempt + 1 < self.retry.attempts:
                log.debug("retrying: %s", problem)
                await asyncio.sleep(self.retry.delay(attempt))
        raise KubeUnavailable(f"{self.server}: {problem}")

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None if there is none."""
        try:
            found: dict[str, Any] = await self.request("GET", path)
        except KubeRejected as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def list(
        self, path: str, *, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """The objects of the collection at `path`, optionally only those with `labels`."""
        query = []
        if labels:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items())))
        answer = await self.request("GET", path, query=query)
        items: list[dict[str, Any]] = answer.get("items", []) if answer else []
        return items

    async def apply(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply `obj` at its resource `path` as Nest's field manager, forcing."""
        applied: dict[str, Any] = await self.request(
            "PATCH",
            path,
            body=dict(obj),
            query=[("fieldManager", names.FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )
        return applied

    async def delete(self, path: str, *, propagation: str = "Background") -> bool:
        """Delete the object at `path`; False if it was already gone."""
        try:
            await self.request(
                "DELETE",
                path,
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                },
            )
        except KubeRejected as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list_with_version(
        self, path: str, *, selector: str = ""
    ) -> tuple[Sequence[dict[str, Any]], str]:
        """The collection's objects matching `selector` and the list's resourceVersion."""
        query = [("labelSelector", selector)] if selector else []
        answer = await self.request("GET", path, query=query) or {}
        version = str((answer.get("metadata") or {}).get("resourceVersion") or "")
        items: Sequence[dict[str, Any]] = answer.get("items") or []
        return items, version

    async def watch(
        self,
        path: str,
        *,
        selector: str = "",
        resource_version: str = "",
        timeout_seconds: int = 300,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The watch events `(type, object)` of the collection at `path` from `resource_version`.

        Ends when the server closes the watch (its timeout); raises `WatchExpired` when the
        version is too old and `KubeUnavailable` when the server cannot be reached. Bookmarks
        are passed through (type `BOOKMARK`) so the caller can advance its version.
        """
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if selector:
            query.append(("labelSelector", selector))
        if resource_version:
            query.append(("resourceVersion", resource_version))
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            response = await self._api.call_api(
                path,
                "GET",
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self.retry.connect_timeout or self.retry.timeout,
                    sock_read=timeout_seconds + 30,
                ),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise WatchExpired(f"watch {path}: {_message(exc)}") from None
            if exc.status not in _TRANSIENT_STATUSES:
                raise _rejected("GET", path, exc) from None
            raise KubeUnavailable(f"{self.server}: watch {path} answered {exc.status}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeUnavailable(f"{self.server}: watch {path} failed: {exc}") from None
        try:
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    raise KubeUnavailable(f"{self.server}: watch {path} broke: {exc}") from None
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = str(event.get("type", ""))
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise WatchExpired(f"watch {path}: {obj.get('message', 'expired')}")
                    raise KubeUnavailable(f"{self.server}: watch {path}: {obj.get('message')}")
                yield kind, obj
        finally:
            response.release()

    async def scale(self, path: str, replicas: int) -> dict[str, Any]:
        """Set `spec.replicas` of the Deployment or StatefulSet at `path` (its `scale`
        subresource, a JSON merge patch); raises `KubeRejected` 404 if it does not exist."""
        answer: dict[str, Any] = await self.request(
            "PATCH",
            f"{path}/scale",
            body={"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )
        return answer

    async def ping(self, path: str = "/version") -> dict[str, Any]:
        """Whether the server answers at all (raises `KubeUnavailable` if not)."""
        answer: dict[str, Any] = await self.request("GET", path)
        return answer


def _proxy_settings_present() -> bool:
    names = ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy", "netrc")
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in names):
        return True
    return (Path.home() / ".netrc").exists()


def _message(exc: ApiException) -> str:
    raw = exc.body
    body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        decoded = json.loads(body) if body else {}
    except ValueError:
        return str(exc.reason or "")
    if isinstance(decoded, dict) and decoded.get("message"):
        return str(decoded["message"])[:300]
    return str(exc.reason or "")


def _rejected(method: str, path: str, exc: ApiException) -> KubeRejected:
    return KubeRejected(
        int(exc.status), f"{method} {path} answered {exc.status}: {_message(exc)}".rstrip(": ")
    )


def _in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod (the service account's API is there)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and bool(
        os.environ.get("KUBERNETES_SERVICE_PORT")
    )
