"""The S3 store's endpoint rule (the egress guard of libs.common) and its secrets, before any
request is made."""

from __future__ import annotations

import pytest

from services.backup import errors
from services.backup.stores.probe import probe
from services.backup.stores.s3 import S3Config, S3Store, check_endpoint


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/",
        "http://169.254.1.1:9000",
        "http://[fe80::1]:9000",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://metadata.google.internal/",
        "http://0.0.0.0:9000",
        "ftp://s3.example.com",
        "s3.example.com",
    ],
)
async def test_forbidden_endpoints(url: str) -> None:
    with pytest.raises(errors.EndpointForbidden):
        await check_endpoint(url)


async def test_loopback_and_private_endpoints_are_allowed() -> None:
    for url in ("http://127.0.0.1:9000", "https://localhost", "http://10.0.0.5:9000"):
        await check_endpoint(url)


async def test_s3_store_refuses_metadata_endpoint_before_any_request() -> None:
    store = S3Store(
        S3Config(
            endpoint_url="http://169.254.169.254",
            bucket="bucket",
            access_key_id="AKIAEXAMPLE",  # type: ignore[arg-type]
            secret_access_key="very-secret-value",  # type: ignore[arg-type]
        )
    )
    with pytest.raises(errors.EndpointForbidden, match=r"169\.254\.169\.254"):
        await probe(store)
    text = repr(store) + repr(store.config) + str(store.config.model_dump())
    assert "very-secret-value" not in text
    assert "AKIAEXAMPLE" not in text
