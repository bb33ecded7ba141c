"""An HTTPS proxy in front of the real management API server: it counts requests and injects
the faults a real API server will not produce on demand (5xx, 429, slow answers, dropped
connections), without imitating any of its behaviour.

The client's own `Authorization` header goes through unchanged, so the API server authorizes
the real identity (e.g. the provisioner's ServiceAccount token). The proxy serves a certificate
from the cluster CA for 127.0.0.1, so a kubeconfig needs only a new server URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.kube import pki
from tests.support.kube.session import ManagementCluster

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int | None
    """Answer this status (with a Kubernetes Status body); None: do not answer at all
    (`delay` then drop the connection), which a client sees as a timeout."""
    delay: float = 0.0
    times: int | None = 1
    """How many requests it hits; None: every one until removed."""
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and bool(self.path.search(path))


@dataclass
class KubeProxy:
    cluster: ManagementCluster
    directory: Path
    faults: list[Fault] = field(default_factory=list)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(method, path without query) -> count, of every request that reached the proxy."""
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def fail(
        self,
        method: str,
        path: str,
        *,
        status: int | None = 503,
        delay: float = 0.0,
        times: int | None = 1,
    ) -> Fault:
        fault = Fault(method, re.compile(path), status, delay, times)
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    def kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig for this proxy authenticating with `token`."""
        certs = pki.load(self.cluster.directory / "pki")
        return pki.kubeconfig(path, self.url, certs.ca.cert, user="proxied", token=token)

    async def start(self) -> None:
        certs = pki.load(self.cluster.directory / "pki")
        cert, key = pki.issue_serving(certs, "nest-test-proxy", ("127.0.0.1",))
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "proxy.crt").write_bytes(cert)
        (self.directory / "proxy.key").write_bytes(key)
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(self.directory / "proxy.crt", self.directory / "proxy.key")
        upstream_context = ssl.create_default_context(cafile=str(certs.ca.cert))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_context, limit=200),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_context)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> KubeProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path) and (fault.times is None or fault.hits < fault.times):
                fault.hits += 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[(request.method, request.path)] += 1
        fault = self._fault_for(request.method, request.path_qs)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is None:
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            reason = "TooManyRequests" if fault.status == 429 else "InternalError"
            headers = {"Retry-After": "1"} if fault.status == 429 else {}
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": f"injected fault {fault.status}",
                    "reason": reason,
                    "code": fault.status,
                },
                status=fault.status,
                headers=headers,
            )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        async with self._session.request(
            request.method,
            f"{self.cluster.url}{request.path_qs}",
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP},
            )
            await response.prepare(request)
            # A watch the client closes ends here, as its connection does: not an error.
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response


def temporary_directory() -> Path:
    return Path(tempfile.mkdtemp(prefix="nest-kube-proxy-"))
