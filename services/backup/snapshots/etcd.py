"""etcd snapshots: stream one out of a member over mutual TLS, checking it on the way.

A snapshot streams over etcd's gRPC API (`Maintenance/Snapshot`, through grpcio with the
response decoded by hand, no generated code) or over its HTTP gateway,
`POST /v3/maintenance/snapshot`, which answers with JSON lines, each carrying a base64 `blob` of
up to 32 KiB; the gateway takes about 4x as long (docs/backup.md). etcd (3.5) appends the sha256
of the snapshot as its last 32 bytes; `EtcdSnapshot` checks that trailer while streaming, with a
32-byte look-behind, and raises `SnapshotCorrupt` at the end of the stream if it does not match,
so the upload it feeds is aborted instead of completed. Memory does not grow with the snapshot.

Restoring a snapshot is `restores.etcd`; drilling one, `drills.etcd`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from services.backup import errors
from services.backup.stores.manifest import EtcdDetails

if TYPE_CHECKING:
    import httpx

TRAILER_SIZE = 32
ALL_KEYS = base64.b64encode(b"\0").decode()


@dataclass(frozen=True)
class EtcdEndpoint:
    """An etcd client URL and the mutual-TLS material (PEM bytes) to reach it."""

    url: str
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only `ca_pem` and presenting the client pair."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        # ssl can only load a private key from a file: a private 0700 dir, removed at once.
        with tempfile.TemporaryDirectory(prefix="nest-etcd-tls-") as directory:
            cert = Path(directory) / "tls.crt"
            key = Path(directory) / "tls.key"
            for path, data in ((cert, self.cert_pem), (key, self.key_pem)):
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(data)
            context.load_cert_chain(cert, key)
        return context


def _timeout(read: float) -> httpx.Timeout:
    # Only the gap between two chunks is bounded, never the whole snapshot: large databases
    # must not time out just for being large.
    import httpx  # with the first snapshot: an idle backup service never loads it

    return httpx.Timeout(connect=10.0, read=read, write=10.0, pool=10.0)


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        raise errors.SnapshotError(f"etcd {path}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise errors.SnapshotError(
            f"etcd {path}: HTTP {response.status_code}: {response.text[:300]}"
        )
    result: dict[str, Any] = response.json()
    return result


@dataclass
class EtcdStatus:
    revision: int
    key_count: int
    version: str | None
    db_size: int


async def status(client: httpx.AsyncClient) -> EtcdStatus:
    """Revision, live key count, server version and DB size of the member `client` talks to."""
    counted = await _post(
        client, "/v3/kv/range", {"key": ALL_KEYS, "range_end": ALL_KEYS, "count_only": True}
    )
    member = await _post(client, "/v3/maintenance/status", {})
    return EtcdStatus(
        revision=int(counted["header"]["revision"]),
        key_count=int(counted.get("count", 0)),
        version=member.get("version"),
        db_size=int(member.get("dbSize", 0)),
    )


Transport = Literal["grpc", "gateway"]


def default_transport() -> Transport:
    """gRPC when grpcio is installed (about 4x faster: no JSON and base64 on either side),
    else the HTTP gateway."""
    return "grpc" if importlib.util.find_spec("grpc") is not None else "gateway"


class EtcdSnapshot:
    """One snapshot stream. Iterate `chunks()` to the end, then read `details()`.

    The snapshot bytes come over gRPC (`Maintenance/Snapshot`) or the HTTP gateway
    (`POST /v3/maintenance/snapshot`); revision and key count always come from the gateway.
    """

    def __init__(
        self,
        endpoint: EtcdEndpoint,
        *,
        read_timeout: float = 120.0,
        transport: Transport | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.read_timeout = read_timeout
        self.transport: Transport = transport or default_transport()
        self.size = 0
        self._before: EtcdStatus | None = None
        self._after_revision: int | None = None
        self._trailer: bytes | None = None

    def client(self) -> httpx.AsyncClient:
        """A gateway client for the endpoint over mutual TLS."""
        import httpx

        return httpx.AsyncClient(
            base_url=self.endpoint.url,
            verify=self.endpoint.ssl_context(),
            timeout=_timeout(self.read_timeout),
        )

    async def chunks(self, client: httpx.AsyncClient | None = None) -> AsyncIterator[bytes]:
        """The snapshot's bytes (trailer included), through `client` or a new mTLS client."""
        async with contextlib.AsyncExitStack() as stack:
            if client is None:
                client = await stack.enter_async_context(self.client())
            self._before = await status(client)
            async for chunk in self._stream(client):
                yield chunk
            after = await _post(client, "/v3/maintenance/status", {})
            self._after_revision = int(after["header"]["revision"])

    async def _stream(self, client: httpx.AsyncClient) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        held = b""  # the last bytes seen, which may be the trailer: hashed once more arrive
        source = self._grpc_blobs() if self.transport == "grpc" else self._gateway_blobs(client)
        async for blob in source:
            self.size += len(blob)
            if len(blob) >= TRAILER_SIZE:
                digest.update(held)
                digest.update(memoryview(blob)[:-TRAILER_SIZE])
                held = blob[-TRAILER_SIZE:]
            else:
                window = held + blob
                digest.update(window[:-TRAILER_SIZE])
                held = window[-TRAILER_SIZE:]
            yield blob
        if self.size <= TRAILER_SIZE:
            raise errors.SnapshotCorrupt(f"etcd snapshot is only {self.size} bytes long")
        if digest.digest() != held:
            raise errors.SnapshotCorrupt(
                "etcd snapshot's sha256 trailer does not match its contents; not stored"
            )
        self._trailer = held

    async def _gateway_blobs(self, client: httpx.AsyncClient) -> AsyncIterator[bytes]:
        import httpx

        try:
            async with client.stream("POST", "/v3/maintenance/snapshot", json={}) as response:
                if response.status_code != 200:
                    body = (await response.aread())[:300].decode(errors="replace")
                    raise errors.SnapshotError(
                        f"etcd snapshot: HTTP {response.status_code}: {body}"
                    )
                async for blob in _blobs(response):
                    yield blob
        except httpx.HTTPError as exc:
            raise errors.SnapshotError(
                f"etcd snapshot broke off after {self.size} bytes: {type(exc).__name__}: {exc}"
            ) from None

    async def _grpc_blobs(self) -> AsyncIterator[bytes]:
        import grpc

        target = urlsplit(self.endpoint.url).netloc
        credentials = grpc.ssl_channel_credentials(
            self.endpoint.ca_pem, self.endpoint.key_pem, self.endpoint.cert_pem
        )
        try:
            # No BDP probing, a fixed 4 MiB receive window: few enough flow-control round
            # trips (about 20 % less CPU than gRPC's 64 KiB default here) while a slow upload
            # still stalls etcd instead of piling snapshot bytes up in this process.
            options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1 << 20)]
            async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
                call = channel.unary_stream(
                    "/etcdserverpb.Maintenance/Snapshot",
                    request_serializer=_empty_request,
                    response_deserializer=snapshot_blob,
                )
                stream = call(None)
                while True:
                    try:
                        blob = await asyncio.wait_for(stream.read(), self.read_timeout)
                    except TimeoutError:
                        stream.cancel()
                        raise errors.SnapshotError(
                            f"etcd snapshot stalled for {self.read_timeout}s "
                            f"after {self.size} bytes"
                        ) from None
                    if blob is grpc.aio.EOF:
                        break
                    yield blob
        except grpc.aio.AioRpcError as exc:
            raise errors.SnapshotError(
                f"etcd snapshot over gRPC failed after {self.size} bytes: "
                f"{exc.code().name}: {exc.details()}"
            ) from None

    def details(self) -> dict[str, Any]:
        """Manifest fields, once `chunks()` has been read to the end."""
        if self._before is None or self._trailer is None or self._after_revision is None:
            raise errors.SnapshotError("snapshot details requested before the stream finished")
        return {
            "etcd": EtcdDetails(
                revision=self._before.revision,
                revision_exact=self._after_revision == self._before.revision,
                key_count=self._before.key_count,
                etcd_version=self._before.version,
                snapshot_sha256=self._trailer.hex(),
            )
        }


async def _blobs(response: httpx.Response) -> AsyncIterator[bytes]:
    """Decode the gateway's JSON lines into snapshot bytes; raise on an `error` line."""
    pending = bytearray()
    async for data in response.aiter_bytes():
        pending += data
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[: end + 1]
            if line.strip():
                yield _decode_line(line)
    if pending.strip():
        yield _decode_line(bytes(pending))


def _empty_request(_: object) -> bytes:
    return b""  # SnapshotRequest has no fields


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise errors.SnapshotError("etcd snapshot: truncated protobuf varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def snapshot_blob(message: bytes) -> bytes:
    """The `blob` (field 3) of an etcdserverpb.SnapshotResponse, decoded by hand so that no
    generated protobuf code is needed; the other fields (header, remaining_bytes) are skipped."""
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(message, position)
        elif wire_type == 2:
            length, position = _varint(message, position)
            if field_number == 3:
                return message[position : position + length]
            position += length
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        else:
            raise errors.SnapshotError(f"etcd snapshot: unexpected protobuf wire type {wire_type}")
    return b""


def _decode_line(line: bytes) -> bytes:
    try:
        message = json.loads(line)
    except ValueError:
        raise errors.SnapshotError(f"etcd snapshot: unreadable line {line[:100]!r}") from None
    if "error" in message:
        error = message["error"]
        raise errors.SnapshotError(f"etcd snapshot failed: {error.get('message', error)}")
    blob = message.get("result", {}).get("blob", "")
    return base64.b64decode(blob) if blob else b""
