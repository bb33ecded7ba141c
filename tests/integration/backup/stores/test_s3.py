"""The S3 store against a real S3 server (SeaweedFS, signatures checked)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.backup import errors
from services.backup.stores.probe import probe
from services.backup.stores.s3 import S3Store
from services.backup.stores.streams import collect, iterate
from tests.integration.backup.conftest import s3_config
from tests.support.etcd import generate_tls
from tests.support.parts import free_port
from tests.support.s3 import SeaweedS3, seaweed


async def test_multipart_round_trip_list_head_delete(
    s3_store: S3Store, s3_server: SeaweedS3
) -> None:
    data = os.urandom(12 << 20)  # three 5 MiB parts, the last one short
    assert await s3_store.put("t/one/blob", iterate(data, 300_000)) == len(data)
    await s3_store.put("t/two/small", iterate(b"small"))
    await s3_store.put("t/two/empty", iterate(b""))
    assert await collect(s3_store.get("t/one/blob"), limit=16 << 20) == data
    assert [i.key for i in await s3_store.list("t/")] == [
        "t/one/blob",
        "t/two/empty",
        "t/two/small",
    ]
    info = await s3_store.head("t/one/blob")
    assert info is not None
    assert info.size == len(data)
    assert await s3_store.head("t/none") is None
    # The store's prefix is applied on the wire and stripped in listings.
    bucket = s3_store.config.bucket
    assert "nest/backups/t/one/blob" in s3_server.keys(bucket)
    await s3_store.delete("t/one/blob")
    await s3_store.delete("t/one/blob")
    assert not await s3_store.exists("t/one/blob")
    with pytest.raises(errors.ObjectNotFound):
        await collect(s3_store.get("t/one/blob"))


async def test_failed_source_aborts_the_multipart_upload(
    s3_store: S3Store, s3_server: SeaweedS3
) -> None:
    async def dying() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield os.urandom(4 << 20)
        raise ConnectionError("source died")

    with pytest.raises(ConnectionError):
        await s3_store.put("t/x/artifact", dying())
    assert await s3_store.list("") == []
    assert s3_server.multipart_uploads(s3_store.config.bucket) == []


async def test_probe_succeeds_and_leaves_nothing(s3_store: S3Store, s3_server: SeaweedS3) -> None:
    await probe(s3_store)
    assert s3_server.keys(s3_store.config.bucket) == []


async def test_probe_bucket_missing(s3_server: SeaweedS3) -> None:
    store = S3Store(s3_config(s3_server, "no-such-bucket-here"))
    try:
        with pytest.raises(errors.BucketNotFound, match="no-such-bucket-here"):
            await probe(store)
    finally:
        await store.close()


async def test_probe_credentials_refused(s3_server: SeaweedS3) -> None:
    bucket = s3_server.new_bucket()
    for overrides in ({"secret_access_key": "wrong-secret"}, {"access_key_id": "AKIAUNKNOWN"}):
        store = S3Store(s3_config(s3_server, bucket, **overrides))
        try:
            with pytest.raises(errors.CredentialsRejected):
                await probe(store)
        finally:
            await store.close()


async def test_probe_endpoint_unreachable(s3_server: SeaweedS3) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    store = S3Store(s3_config(s3_server, "bucket", endpoint_url=closed))
    try:
        with pytest.raises(errors.EndpointUnreachable, match=r"127\.0\.0\.1"):
            await probe(store)
    finally:
        await store.close()


async def test_cleanup_aborts_stale_multipart_uploads(
    s3_store: S3Store, s3_server: SeaweedS3
) -> None:
    client = await s3_store.client()
    await client.create_multipart_upload(Bucket=s3_store.config.bucket, Key="nest/backups/t/x/y")
    assert s3_server.multipart_uploads(s3_store.config.bucket) == ["nest/backups/t/x/y"]
    assert await s3_store.cleanup_uploads(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await s3_store.cleanup_uploads(datetime.now(UTC) + timedelta(minutes=1)) == 1
    assert s3_server.multipart_uploads(s3_store.config.bucket) == []


def test_secrets_never_in_repr(s3_server: SeaweedS3) -> None:
    store = S3Store(s3_config(s3_server, "bucket"))
    shown = repr(store) + repr(store.config) + store.description + str(store.config)
    assert s3_server.secret_key not in shown
    assert s3_server.access_key not in shown


async def test_https_endpoint_with_a_private_ca(tmp_path: Path) -> None:
    """On-prem stores use their own CA; the configured bundle is what counts (AWS_CA_BUNDLE is
    set machine-wide here and must not get in the way), and an untrusted one is refused."""
    tls = generate_tls()
    certs = tmp_path / "tls"
    certs.mkdir()
    (certs / "tls.crt").write_bytes(tls.server_cert_pem)
    (certs / "tls.key").write_bytes(tls.server_key_pem)
    (certs / "ca.crt").write_bytes(tls.ca_pem)
    with seaweed(tmp_path / "seaweed", tls=(certs / "tls.crt", certs / "tls.key")) as server:
        bucket = server.new_bucket()
        trusted = S3Store(
            s3_config(
                server, bucket, endpoint_url=server.https_endpoint, verify=str(certs / "ca.crt")
            )
        )
        untrusted = S3Store(s3_config(server, bucket, endpoint_url=server.https_endpoint))
        try:
            await probe(trusted)
            await trusted.put("t/x/blob", iterate(b"over tls"))
            assert await collect(trusted.get("t/x/blob")) == b"over tls"
            with pytest.raises(errors.EndpointUntrusted, match="NEST_BACKUP_S3_CA_BUNDLE"):
                await probe(untrusted)
        finally:
            await trusted.close()
            await untrusted.close()
