"""The S3 store: a bucket and key prefix on any S3-compatible server, through aioboto3.

Uploads are multipart in bounded memory (`part_size` x `upload_concurrency`), downloads resume
with ranged GETs when a stream breaks off, and every botocore failure is translated into one
store error type (`translate`). A user-supplied endpoint passes the egress guard
(`libs.common.egress`) before the first request, on its text and on what its host resolves to.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from libs.common.egress import EgressRefused, check_resolved
from services.backup import errors
from services.backup.stores.objects import READ_CHUNK, ObjectInfo, validate_key
from services.backup.stores.streams import file_size, rechunk_files

log = logging.getLogger(__name__)


class S3Config(BaseModel):
    """Where and how to reach an S3 bucket. The credentials never appear in repr or logs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None
    """e.g. https://s3.example.com; None: AWS's default endpoint for the region."""
    bucket: str = Field(min_length=3, max_length=63)
    """The bucket; it must exist (Nest never creates buckets)."""
    prefix: str = ""
    """Key prefix inside the bucket, e.g. `nest/prod`; no leading or trailing slash needed."""
    region: str = "us-east-1"
    """Signing region."""
    access_key_id: SecretStr
    """Access key id."""
    secret_access_key: SecretStr
    """Secret access key."""
    path_style: bool = False
    """Address the bucket as `<endpoint>/<bucket>` (MinIO, SeaweedFS, most on-prem stores)."""
    part_size: int = Field(default=8 << 20, ge=5 << 20, le=512 << 20)
    """Multipart part size; memory per upload is about (concurrency + 1) x this."""
    upload_concurrency: int = Field(default=2, ge=1, le=16)
    """Parts uploaded at the same time."""
    connect_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for a TCP/TLS connection."""
    read_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for a response."""
    max_attempts: int = Field(default=3, ge=1)
    """Attempts per request (botocore's standard retry mode)."""
    verify: bool | str = True
    """TLS verification: True, False, or a CA bundle path."""
    resume_attempts: int = Field(default=5, ge=0)
    """Times a download broken off mid-stream is resumed (ranged GET) before it fails."""


async def check_endpoint(url: str) -> None:
    """Refuse an endpoint the egress guard refuses (`EndpointForbidden`), or whose host does not
    resolve (`EndpointUnreachable`)."""
    try:
        await check_resolved(url)
    except EgressRefused as exc:
        raise errors.EndpointForbidden(f"S3 endpoint {url!r} refused: it {exc}") from None
    except OSError as exc:
        host = urlsplit(url).hostname
        raise errors.EndpointUnreachable(
            f"cannot resolve S3 endpoint host {host!r}: {exc}"
        ) from None


_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
     "AuthorizationHeaderMalformed", "InvalidSecurity"}
)  # fmt: skip


def translate(exc: BaseException, what: str) -> errors.BackupError:
    """Map a botocore/aiohttp failure to one of the store error types."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import SSLError as BotoSSLError

    if isinstance(exc, errors.BackupError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = f"{what}: {code or status} {error.get('Message', '')}".strip()
        if code == "NoSuchBucket":
            return errors.BucketNotFound(message)
        if code in ("NoSuchKey", "NotFound") or (code == "404" and status == 404):
            return errors.ObjectNotFound(message)
        if code in _CREDENTIAL_CODES:
            return errors.CredentialsRejected(message)
        if code == "AccessDenied" or status == 403:
            return errors.AccessDenied(message)
        return errors.StoreError(message)
    if isinstance(exc, BotoSSLError | ssl.SSLCertVerificationError) or isinstance(
        exc.__cause__, ssl.SSLCertVerificationError
    ):
        return errors.EndpointUntrusted(
            f"{what}: the endpoint's TLS certificate is not trusted; give its CA bundle "
            f"(NEST_BACKUP_S3_CA_BUNDLE): {exc}"
        )
    if isinstance(exc, NoCredentialsError):
        return errors.CredentialsRejected(f"{what}: no credentials")
    if isinstance(exc, BotoConnectionError | TimeoutError | OSError):
        return errors.EndpointUnreachable(f"{what}: {exc}")
    if isinstance(exc, BotoCoreError):
        return errors.StoreError(f"{what}: {exc}")
    return errors.StoreError(f"{what}: {type(exc).__name__}: {exc}")


def _resumable(error: errors.BackupError) -> bool:
    """Worth retrying: the endpoint went away (restarting, network), not a refusal."""
    return isinstance(error, errors.EndpointUnreachable) or type(error) is errors.StoreError


def _raise_failed(tasks: list[asyncio.Task[dict[str, Any]]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and (failure := task.exception()) is not None:
            raise failure


class S3Store:
    """A bucket (and key prefix) on an S3-compatible store, through aioboto3."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self.resumed = 0
        """Downloads resumed after breaking off (for logs and tests)."""

    def __repr__(self) -> str:
        return f"S3Store({self.description})"

    @property
    def description(self) -> str:
        endpoint = self.config.endpoint_url or f"aws:{self.config.region}"
        return f"s3://{self.config.bucket}/{self._prefix} at {endpoint}"

    @property
    def _prefix(self) -> str:
        prefix = self.config.prefix.strip("/")
        return f"{prefix}/" if prefix else ""

    def _key(self, key: str) -> str:
        return self._prefix + validate_key(key)

    async def client(self) -> Any:
        """The aiobotocore S3 client, created (after the endpoint check) on first use."""
        async with self._lock:
            if self._client is None:
                import aioboto3
                from botocore.config import Config

                if self.config.endpoint_url:
                    await check_endpoint(self.config.endpoint_url)
                config = Config(
                    s3={"addressing_style": "path" if self.config.path_style else "auto"},
                    connect_timeout=self.config.connect_timeout,
                    read_timeout=self.config.read_timeout,
                    retries={"max_attempts": self.config.max_attempts, "mode": "standard"},
                    max_pool_connections=max(10, self.config.upload_concurrency * 2),
                    request_checksum_calculation="when_required",
                )
                stack = contextlib.AsyncExitStack()
                session = aioboto3.Session()
                self._client = await stack.enter_async_context(
                    session.client(
                        "s3",
                        endpoint_url=self.config.endpoint_url,
                        region_name=self.config.region,
                        aws_access_key_id=self.config.access_key_id.get_secret_value(),
                        aws_secret_access_key=self.config.secret_access_key.get_secret_value(),
                        config=config,
                        verify=self.config.verify,
                    )
                )
                self._stack = stack
            return self._client

    async def close(self) -> None:
        async with self._lock:
            if self._stack is not None:
                await self._stack.aclose()
            self._client, self._stack = None, None

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        full = self._key(key)
        client = await self.client()
        parts = rechunk_files(chunks, self.config.part_size)
        first = await anext(parts, None)
        second = None if first is None else await anext(parts, None)
        if second is None:
            body = first or io.BytesIO()
            try:
                await client.put_object(Bucket=self.config.bucket, Key=full, Body=body)
            except Exception as exc:
                raise translate(exc, f"put {full}") from exc
            return file_size(body)
        try:
            created = await client.create_multipart_upload(Bucket=self.config.bucket, Key=full)
        except Exception as exc:
            raise translate(exc, f"start upload {full}") from exc
        upload_id = str(created["UploadId"])
        head = [first or io.BytesIO(), second]
        first = second = None  # the list owns them now; each is freed once uploaded
        try:
            return await self._upload_parts(client, full, upload_id, head, parts)
        except BaseException:
            # Abort so the store keeps no half-written upload; cleanup_uploads catches the rest.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    client.abort_multipart_upload(
                        Bucket=self.config.bucket, Key=full, UploadId=upload_id
                    )
                )
            raise

    async def _upload_parts(
        self,
        client: Any,
        full: str,
        upload_id: str,
        head: list[io.BytesIO],
        rest: AsyncIterator[io.BytesIO],
    ) -> int:
        slots = asyncio.Semaphore(self.config.upload_concurrency)
        tasks: list[asyncio.Task[dict[str, Any]]] = []

        async def upload(number: int, body: io.BytesIO) -> dict[str, Any]:
            try:
                response = await client.upload_part(
                    Bucket=self.config.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
            except Exception as exc:
                raise translate(exc, f"upload part {number} of {full}") from exc
            finally:
                slots.release()
            return {"PartNumber": number, "ETag": response["ETag"]}

        total = 0
        try:
            number = 0
            while True:
                # Take a slot before producing the next part: at most `upload_concurrency`
                # parts exist at once besides the one being filled.
                await slots.acquire()
                _raise_failed(tasks)  # a failed part stops the upload at once
                body = head.pop(0) if head else await anext(rest, None)
                if body is None:
                    slots.release()
                    break
                number += 1
                total += file_size(body)
                tasks.append(asyncio.create_task(upload(number, body)))
                del body
            done = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        try:
            await client.complete_multipart_upload(
                Bucket=self.config.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": list(done)},
            )
        except Exception as exc:
            raise translate(exc, f"complete upload {full}") from exc
        return total

    async def get(self, key: str) -> AsyncIterator[bytes]:
        """Stream the object; a download broken off mid-way resumes with a ranged GET from
        where it stopped (pinned to the same version by ETag), up to `resume_attempts` times."""
        full = self._key(key)
        client = await self.client()
        offset = 0
        etag: str | None = None
        failures = 0
        while True:
            request: dict[str, Any] = {"Bucket": self.config.bucket, "Key": full}
            if offset:
                request["Range"] = f"bytes={offset}-"
                if etag:
                    request["IfMatch"] = etag
            try:
                response = await client.get_object(**request)
            except Exception as exc:
                error = translate(exc, f"get {full}")
                failures += 1
                if offset == 0 or not _resumable(error) or failures > self.config.resume_attempts:
                    raise error from exc
                await asyncio.sleep(min(0.5 * 2**failures, 10.0))
                continue
            etag = etag or response.get("ETag")
            body = response["Body"]
            try:
                while chunk := await body.read(READ_CHUNK):
                    offset += len(chunk)
                    yield chunk
                return
            except Exception as exc:
                error = translate(exc, f"read {full} at byte {offset}")
                failures += 1
                if failures > self.config.resume_attempts:
                    raise error from exc
                self.resumed += 1
                log.warning("download broken off; resuming", extra={"key": full, "at": offset})
                await asyncio.sleep(min(0.5 * 2**failures, 10.0))
            finally:
                body.close()

    async def head(self, key: str) -> ObjectInfo | None:
        full = self._key(key)
        client = await self.client()
        try:
            response = await client.head_object(Bucket=self.config.bucket, Key=full)
        except Exception as exc:
            error = translate(exc, f"head {full}")
            if isinstance(error, errors.ObjectNotFound):
                return None
            raise error from exc
        return ObjectInfo(key, int(response["ContentLength"]), response["LastModified"])

    async def exists(self, key: str) -> bool:
        return await self.head(key) is not None

    async def list(self, prefix: str) -> list[ObjectInfo]:
        client = await self.client()
        found: list[ObjectInfo] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(
                Bucket=self.config.bucket, Prefix=self._prefix + prefix
            ):
                for item in page.get("Contents", []):
                    key = str(item["Key"])[len(self._prefix) :]
                    found.append(ObjectInfo(key, int(item["Size"]), item["LastModified"]))
        except Exception as exc:
            raise translate(exc, f"list {self._prefix + prefix}") from exc
        return sorted(found, key=lambda info: info.key)

    async def delete(self, key: str) -> None:
        full = self._key(key)
        client = await self.client()
        try:
            await client.delete_object(Bucket=self.config.bucket, Key=full)
        except Exception as exc:
            error = translate(exc, f"delete {full}")
            if not isinstance(error, errors.ObjectNotFound):
                raise error from exc

    async def cleanup_uploads(self, older_than: datetime) -> int:
        client = await self.client()
        removed = 0
        try:
            paginator = client.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.config.bucket, Prefix=self._prefix):
                for upload in page.get("Uploads", []):
                    initiated = upload.get("Initiated")
                    if initiated is not None and initiated >= older_than:
                        continue
                    await client.abort_multipart_upload(
                        Bucket=self.config.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    removed += 1
        except Exception as exc:
            raise translate(exc, "clean up multipart uploads") from exc
        return removed

    async def check_bucket(self) -> None:
        """Raise BucketNotFound / EndpointUnreachable / CredentialsRejected for the bucket."""
        client = await self.client()
        try:
            await client.head_bucket(Bucket=self.config.bucket)
        except Exception as exc:
            error = translate(exc, f"bucket {self.config.bucket}")
            if isinstance(error, errors.ObjectNotFound):
                raise errors.BucketNotFound(
                    f"bucket {self.config.bucket!r} does not exist at {self.description}"
                ) from exc
            # HEAD answers carry no error code, so a 403 here could be either bad credentials
            # or a policy; the probe's PUT that follows tells them apart.
            if not isinstance(error, errors.AccessDenied):
                raise error from exc
