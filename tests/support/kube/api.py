"""A small async client of the Kubernetes REST API for the harness and the tests, on httpx.

Independent of Nest's own client (`services.provisioner.kube`), so a test that checks what the
provisioner did does not look through the provisioner's eyes. Paths are written as the API
spells them (`/api/v1/namespaces/x/pods`); `Informer` keeps a list+watch cache of one
collection and calls a handler for every change, as client-go's informers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status} {body[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    token: str | None = None

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Credentials:
        import base64

        config = yaml.safe_load(path.read_text())
        context = next(
            c["context"] for c in config["contexts"] if c["name"] == config["current-context"]
        )
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])

        def data(entry: dict[str, Any], key: str) -> bytes | None:
            if f"{key}-data" in entry:
                return base64.b64decode(entry[f"{key}-data"])
            if key in entry:
                return Path(entry[key]).read_bytes()
            return None

        ca = data(cluster, "certificate-authority")
        assert ca is not None, f"{path}: no certificate-authority"
        return cls(
            server=cluster["server"],
            ca_pem=ca,
            cert_pem=data(user, "client-certificate"),
            key_pem=data(user, "client-key"),
            token=user.get("token"),
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        if self.cert_pem and self.key_pem:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
                cert.write_bytes(self.cert_pem)
                key.write_bytes(self.key_pem)
                context.load_cert_chain(cert, key)
        return context


class Api:
    """One API server. Methods raise `ApiError` for any non-2xx answer except where noted."""

    def __init__(self, credentials: Credentials, *, timeout: float = 30.0) -> None:
        self.credentials = credentials
        headers = {"Accept": "application/json"}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        self._client = httpx.AsyncClient(
            base_url=credentials.server,
            verify=credentials.ssl_context(),
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    @classmethod
    def from_kubeconfig(cls, path: Path, **kwargs: Any) -> Api:
        return cls(Credentials.from_kubeconfig(path), **kwargs)

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        ok_missing: bool = False,
    ) -> Obj | None:
        content = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content is not None else {}
        response = await self._client.request(
            method, path, content=content, params=params, headers=headers
        )
        if ok_missing and response.status_code == 404:
            return None
        if response.status_code >= 300:
            raise ApiError(response.status_code, response.text, method, path)
        return dict(response.json()) if response.content else {}

    async def get(self, path: str) -> Obj | None:
        """The object at `path`, or None if it does not exist."""
        return await self.request("GET", path, ok_missing=True)

    async def list(self, path: str, **params: Any) -> list[Obj]:
        found = await self.request("GET", path, params=params or None)
        assert found is not None
        return list(found.get("items") or [])

    async def create(self, path: str, body: Obj) -> Obj:
        created = await self.request("POST", path, body=body)
        assert created is not None
        return created

    async def apply(self, path: str, body: Obj, manager: str = "nest-harness") -> Obj:
        """Server-side apply (forced) of `body` to `path` (the object's own path)."""
        applied = await self.request(
            "PATCH",
            path,
            body=body,
            params={"fieldManager": manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        assert applied is not None
        return applied

    async def merge_patch(self, path: str, patch: Obj) -> Obj | None:
        return await self.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json", ok_missing=True
        )

    async def delete(self, path: str, **options: Any) -> bool:
        """Delete; False if it was already gone. `options` go into the DeleteOptions body."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", **options} if options else None
        return await self.request("DELETE", path, body=body, ok_missing=True) is not None

    async def watch(
        self, path: str, resource_version: str, **params: Any
    ) -> AsyncIterator[tuple[str, Obj]]:
        """(type, object) events from a watch starting after `resource_version`; ends when the
        server closes the stream. A 410 (expired) arrives as an `ERROR` event."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "300",
            **params,
        }
        async with self._client.stream(
            "GET", path, params=query, timeout=httpx.Timeout(30.0, read=360.0)
        ) as response:
            if response.status_code >= 300:
                body = (await response.aread()).decode(errors="replace")
                raise ApiError(response.status_code, body, "WATCH", path)
            async for line in response.aiter_lines():
                if line.strip():
                    event = json.loads(line)
                    yield event["type"], event["object"]


Handler = Callable[[str, Obj], Awaitable[None]]
"""Called with ("ADDED" | "MODIFIED" | "DELETED", object) for every change in the cache."""


def key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


class Informer:
    """A list+watch cache of one collection (e.g. `/api/v1/pods`), with a change handler.

    On start it lists (every object is handed over as ADDED), then watches from the list's
    resourceVersion; a watch that ends resumes where it was, a 410 lists again and reports the
    difference. Handler errors are logged, never stop the informer.
    """

    def __init__(
        self,
        api: Api,
        path: str,
        handler: Handler,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> None:
        self.api = api
        self.path = path
        self.handler = handler
        self.params: dict[str, str] = {}
        if label_selector:
            self.params["labelSelector"] = label_selector
        if field_selector:
            self.params["fieldSelector"] = field_selector
        self.cache: dict[tuple[str, str], Obj] = {}
        self.synced = asyncio.Event()

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.cache.get((namespace, name))

    def items(self) -> list[Obj]:
        return list(self.cache.values())

    async def _emit(self, kind: str, obj: Obj) -> None:
        try:
            await self.handler(kind, obj)
        except Exception:
            log.exception("handler of %s failed on %s %s", self.path, kind, key(obj))

    async def _relist(self) -> str:
        listed = await self.api.request("GET", self.path, params=self.params or None)
        assert listed is not None
        fresh = {key(obj): obj for obj in listed.get("items") or []}
        kind = listed.get("kind", "List").removesuffix("List")
        api_version = listed.get("apiVersion", "v1")
        for k, obj in fresh.items():
            obj.setdefault("kind", kind)
            obj.setdefault("apiVersion", api_version)
            old = self.cache.get(k)
            self.cache[k] = obj
            if old is None:
                await self._emit("ADDED", obj)
            elif old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                await self._emit("MODIFIED", obj)
        for k in set(self.cache) - set(fresh):
            await self._emit("DELETED", self.cache.pop(k))
        return str(listed["metadata"]["resourceVersion"])

    async def run(self) -> None:
        version = ""
        delay = 0.2
        while True:
            try:
                if not version:
                    version = await self._relist()
                    self.synced.set()
                async for kind, obj in self.api.watch(self.path, version, **self.params):
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            version = ""
                        break
                    version = obj["metadata"].get("resourceVersion", version)
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        self.cache.pop(key(obj), None)
                    else:
                        self.cache[key(obj)] = obj
                    await self._emit(kind, obj)
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status == 410:
                    version = ""
                else:
                    log.warning("watch %s: %s", self.path, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            except (httpx.HTTPError, OSError) as exc:
                log.debug("watch %s ended: %s", self.path, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


@contextlib.asynccontextmanager
async def running(*informers: Informer) -> AsyncIterator[None]:
    """Run the informers for the duration of the block (their initial lists done first)."""
    tasks = [asyncio.create_task(i.run(), name=f"informer {i.path}") for i in informers]
    try:
        await asyncio.gather(*(i.synced.wait() for i in informers))
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
