"""The snapshot stream decoder and trailer check, against scripted gateway answers.

The real etcd is exercised in tests/integration/backup; here the HTTP answers are scripted to
reach what a healthy etcd never sends: a bad trailer, an error line, a stream cut short.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

import httpx
import pytest

from services.backup import errors
from services.backup.snapshots.etcd import EtcdEndpoint, EtcdSnapshot, snapshot_blob
from services.backup.stores.streams import collect


def gateway(lines: list[bytes], status: int = 200) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/kv/range":
            return httpx.Response(200, json={"header": {"revision": "42"}, "count": "7"})
        if request.url.path == "/v3/maintenance/status":
            return httpx.Response(200, json={"header": {"revision": "42"}, "version": "3.5.1"})
        return httpx.Response(status, content=b"\n".join(lines) + b"\n")

    return httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://etcd")


def blob_lines(data: bytes, size: int = 32 * 1024) -> list[bytes]:
    return [
        json.dumps({"result": {"blob": base64.b64encode(data[i : i + size]).decode()}}).encode()
        for i in range(0, len(data), size)
    ]


def snapshot() -> EtcdSnapshot:
    return EtcdSnapshot(EtcdEndpoint("https://etcd", b"", b"", b""), transport="gateway")


async def test_good_trailer_passes_and_details_are_recorded() -> None:
    body = os.urandom(100_000)
    data = body + hashlib.sha256(body).digest()
    snap = snapshot()
    async with gateway(blob_lines(data)) as client:
        assert await collect(snap.chunks(client)) == data
    details = snap.details()["etcd"]
    assert (details.revision, details.key_count, details.revision_exact) == (42, 7, True)
    assert details.snapshot_sha256 == hashlib.sha256(body).hexdigest()


async def test_trailer_split_across_messages_is_handled() -> None:
    body = os.urandom(1000)
    data = body + hashlib.sha256(body).digest()
    async with gateway(blob_lines(data, size=10)) as client:
        assert await collect(snapshot().chunks(client)) == data


async def test_bad_trailer_is_refused() -> None:
    body = os.urandom(5000)
    data = body + hashlib.sha256(body + b"x").digest()
    with pytest.raises(errors.SnapshotCorrupt, match="trailer does not match"):
        async with gateway(blob_lines(data)) as client:
            await collect(snapshot().chunks(client))


async def test_hashless_tiny_snapshot_is_refused() -> None:
    with pytest.raises(errors.SnapshotCorrupt, match="only 10 bytes"):
        async with gateway(blob_lines(b"0123456789")) as client:
            await collect(snapshot().chunks(client))


async def test_error_line_is_reported() -> None:
    lines = [
        *blob_lines(b"a" * 100),
        b'{"error": {"grpc_code": 14, "message": "etcdserver: no leader"}}',
    ]
    with pytest.raises(errors.SnapshotError, match="no leader"):
        async with gateway(lines) as client:
            await collect(snapshot().chunks(client))


async def test_http_error_is_reported() -> None:
    with pytest.raises(errors.SnapshotError, match="HTTP 503"):
        async with gateway([b"unavailable"], status=503) as client:
            await collect(snapshot().chunks(client))


def test_details_before_the_end_are_refused() -> None:
    with pytest.raises(errors.SnapshotError, match="before the stream finished"):
        snapshot().details()


def test_endpoint_repr_hides_the_key() -> None:
    endpoint = EtcdEndpoint("https://etcd:2379", b"CA", b"CERT", b"-----BEGIN PRIVATE KEY-----")
    assert "PRIVATE" not in repr(endpoint)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_grpc_snapshot_response_blob_is_decoded() -> None:
    blob = os.urandom(40_000)
    header = b"\x08" + _varint(12345) + b"\x20" + _varint(7)  # cluster_id, raft_term
    message = (
        b"\x0a"
        + _varint(len(header))
        + header  # 1: header
        + b"\x10"
        + _varint(2**40)  # 2: remaining_bytes
        + b"\x1a"
        + _varint(len(blob))
        + blob  # 3: blob
    )
    assert snapshot_blob(message) == blob
    assert snapshot_blob(b"\x10" + _varint(0)) == b""
    with pytest.raises(errors.SnapshotError, match="truncated"):
        snapshot_blob(b"\x10\xff")
