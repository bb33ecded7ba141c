"""Object stores for backup artifacts: a local directory (the embedded default) and S3.

Both speak the same small async interface (`ObjectStore`): streaming `put` from an async byte
iterator in bounded memory, `get` as an async byte stream, `list` by prefix, `head`, `exists`,
`delete`, and `cleanup_uploads` for what an interrupted `put` may leave behind (a temp file, an
unfinished multipart upload). A `put` either stores the whole object or nothing under its key.

`probe(store)` writes, reads back and deletes a small object and raises one exception type per
failure kind (`errors.BucketNotFound`, `errors.CredentialsRejected`, `errors.EndpointUnreachable`,
...), which is what an API "test this destination" button needs.

S3 endpoints are resolved before use and refused when they point at link-local or cloud-metadata
addresses, so a user-supplied endpoint cannot be turned against the host's metadata service.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import logging
import os
import secrets
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.backup import errors
from services.backup.streams import collect, file_size, iterate, rechunk_files

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_CHUNK = 1 << 20
"""Bytes per chunk when a store streams an object back."""

TEMP_MARKER = ".part-"
"""Local temp files are named `.<name>.part-<random>`; listing skips them, cleanup removes them."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the store's prefix), size and last change."""

    key: str
    size: int
    modified: datetime


class ObjectStore(Protocol):
    """Where backup artifacts live. Keys are `/`-separated, relative to the store's own prefix."""

    @property
    def description(self) -> str:
        """A human-readable location without secrets, safe to log."""

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Store the stream under `key` (all or nothing); return the number of bytes stored.
        Store failures raise StoreError subtypes; a failing source's exception passes through."""

    def get(self, key: str) -> AsyncIterator[bytes]:
        """Stream the object's bytes; raises `errors.ObjectNotFound` when iterated if absent."""

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if there is no such object."""

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every complete object whose key starts with `prefix`, sorted by key."""

    async def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    async def cleanup_uploads(self, older_than: datetime) -> int:
        """Remove leftovers of interrupted puts started before `older_than`; return how many."""

    async def close(self) -> None:
        """Release connections."""


def validate_key(key: str) -> str:
    """Refuse keys that could escape the store's root or collide with temp files."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    if any(p.startswith(".") and TEMP_MARKER in p for p in parts):
        raise ValueError(f"invalid object key {key!r} (reserved temp-file name)")
    return key


# --- local directory -----------------------------------------------------------------------


async def _disk(what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking file operation in a thread; map OSError to the store error types."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except PermissionError as exc:
        raise errors.AccessDenied(f"{what}: permission denied ({exc.strerror})") from None
    except OSError as exc:
        raise errors.StoreError(f"{what}: {exc.strerror or exc}") from None


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalStore:
    """A directory tree; each object a file. Writes go to a temp file, fsync, rename, fsync dir."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync

    @property
    def description(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        final = self._path(key)
        await _disk(f"create {final.parent}", final.parent.mkdir, parents=True, exist_ok=True)
        temp = final.with_name(f".{final.name}{TEMP_MARKER}{secrets.token_hex(6)}")
        handle = await _disk(f"create {temp}", temp.open, "xb")
        written = 0
        try:
            try:
                # The source's own exceptions pass through; only disk errors are translated.
                async for chunk in chunks:
                    await _disk(f"write {temp}", handle.write, chunk)
                    written += len(chunk)
                await _disk(f"write {temp}", handle.flush)
                if self.fsync:
                    await _disk(f"fsync {temp}", os.fsync, handle.fileno())
            finally:
                await asyncio.to_thread(handle.close)
            await _disk(f"rename {temp}", os.replace, temp, final)
            if self.fsync:
                await _disk(f"fsync {final.parent}", _fsync_dir, final.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return written

    async def get(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise errors.ObjectNotFound(f"no object {key!r} in {self.description}") from None
        try:
            while chunk := await asyncio.to_thread(handle.read, READ_CHUNK):
                yield chunk
        finally:
            handle.close()

    async def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            stat = await asyncio.to_thread(path.stat)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    async def exists(self, key: str) -> bool:
        return await self.head(key) is not None

    def _walk(self, prefix: str, *, temp: bool) -> list[tuple[str, os.stat_result]]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        found: list[tuple[str, os.stat_result]] = []
        if not base.is_dir():
            return found
        for directory, _, files in os.walk(base):
            for name in files:
                is_temp = name.startswith(".") and TEMP_MARKER in name
                if is_temp != temp:
                    continue
                path = Path(directory) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((key, path.stat()))
        return found

    async def list(self, prefix: str) -> list[ObjectInfo]:
        entries = await asyncio.to_thread(self._walk, prefix, temp=False)
        return sorted(
            (ObjectInfo(k, s.st_size, datetime.fromtimestamp(s.st_mtime, UTC)) for k, s in entries),
            key=lambda info: info.key,
        )

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
        # Drop directories left empty, up to the root, so listings stay small.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                await asyncio.to_thread(parent.rmdir)
            except OSError:
                break
            parent = parent.parent

    async def cleanup_uploads(self, older_than: datetime) -> int:
        removed = 0
        for key, stat in await asyncio.to_thread(self._walk, "", temp=True):
            if datetime.fromtimestamp(stat.st_mtime, UTC) < older_than:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread((self.root / key).unlink)
                    removed += 1
        return removed

    async def close(self) -> None:
        return None


# --- S3 ------------------------------------------------------------------------------------


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


_METADATA_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local; AWS/GCP/Azure/OpenStack metadata at 169.254.169.254
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "0.0.0.0/32",
        "::/128",
    )
)
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "instance-data"})


def forbidden_address(address: str) -> bool:
    """Whether an IP address is link-local, a cloud-metadata address or unspecified."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or any(ip in network for network in _METADATA_NETWORKS)


async def check_endpoint(url: str) -> None:
    """Refuse an endpoint URL that is not http(s) or resolves to a forbidden address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.EndpointForbidden(f"S3 endpoint must be an http(s) URL with a host: {url!r}")
    host = parts.hostname.rstrip(".").lower()
    if host in _METADATA_NAMES:
        raise errors.EndpointForbidden(f"S3 endpoint {host!r} is a cloud metadata service")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise errors.EndpointForbidden(f"S3 endpoint has an invalid port: {url!r}") from None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise errors.EndpointUnreachable(
            f"cannot resolve S3 endpoint host {host!r}: {exc}"
        ) from None
    for info in infos:
        address = str(info[4][0])
        if forbidden_address(address):
            raise errors.EndpointForbidden(
                f"S3 endpoint {host!r} resolves to {address}, a link-local or metadata address"
            )


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


PROBE_PREFIX = ".nest-probe/"


async def probe(store: ObjectStore) -> None:
    """Write, read back and delete a probe object; raise a specific StoreError on failure."""
    if isinstance(store, S3Store):
        await store.check_bucket()
    key = f"{PROBE_PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(6)}"
    payload = secrets.token_bytes(1024)
    await store.put(key, iterate(payload))
    try:
        echoed = await collect(store.get(key))
        if echoed != payload:
            raise errors.ProbeMismatch(f"probe object read back differs at {store.description}")
    finally:
        await store.delete(key)
    if await store.exists(key):
        raise errors.StoreError(f"probe object could not be deleted at {store.description}")
