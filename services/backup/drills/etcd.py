"""The etcd drill: restore a snapshot into a scratch directory, start a throwaway etcd on it
(loopback only, no fsync), read its revision and key count back and compare them with what the
manifest recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from services.backup import errors
from services.backup.restores.etcd import find_tool, restore_snapshot
from services.backup.snapshots.etcd import EtcdStatus, status
from services.backup.stores import artifacts, crypto
from services.backup.stores.manifest import EtcdDetails, Manifest
from services.backup.stores.objects import ObjectStore


@dataclass(frozen=True)
class DrillResult:
    """What a scratch etcd started on the restored data reported."""

    revision: int
    key_count: int
    seconds: float


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def restore_drill(
    path: Path,
    scratch: Path,
    expected: EtcdDetails | None = None,
    *,
    bin_dir: Path | None = None,
    start_timeout: float = 60.0,
) -> DrillResult:
    """Restore `path` into `scratch`, start a throwaway etcd on it (loopback only, no fsync),
    and compare its revision and key count with `expected` (raising RestoreError if they differ).
    """
    began = time.monotonic()
    data_dir = scratch / "etcd-data"
    peer_url = f"http://127.0.0.1:{_free_port()}"
    await restore_snapshot(path, data_dir, name="drill", peer_url=peer_url, bin_dir=bin_dir)
    client_url = f"http://127.0.0.1:{_free_port()}"
    etcd = find_tool("etcd", bin_dir)
    log_path = scratch / "etcd-drill.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(etcd),
            "--name=drill",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=drill={peer_url}",
            "--listen-metrics-urls=",
            "--unsafe-no-fsync",
            "--log-level=warn",
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("ETCD")},
            start_new_session=True,
        )
    try:
        found = await _wait_status(process, client_url, start_timeout, log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    result = DrillResult(found.revision, found.key_count, time.monotonic() - began)
    if expected is not None:
        _compare(result, expected)
    return result


async def _wait_status(
    process: asyncio.subprocess.Process, url: str, timeout: float, log_path: Path
) -> EtcdStatus:
    import httpx  # with the first drill: an idle backup service never loads it

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                tail = (await asyncio.to_thread(log_path.read_text, errors="replace"))[-1000:]
                raise errors.RestoreError(f"scratch etcd exited with {process.returncode}: {tail}")
            with contextlib.suppress(httpx.HTTPError, errors.SnapshotError):
                health = await client.get("/health")
                if health.status_code == 200 and health.json().get("health") == "true":
                    return await status(client)
            await asyncio.sleep(0.1)
    raise errors.RestoreError(f"scratch etcd did not become healthy within {timeout}s")


def _compare(result: DrillResult, expected: EtcdDetails) -> None:
    if expected.revision_exact:
        if (result.revision, result.key_count) != (expected.revision, expected.key_count):
            raise errors.RestoreError(
                f"restored etcd has revision {result.revision} and {result.key_count} keys; "
                f"the manifest recorded revision {expected.revision} and "
                f"{expected.key_count} keys"
            )
    elif result.revision < expected.revision:
        raise errors.RestoreError(
            f"restored etcd has revision {result.revision}, older than the manifest's "
            f"{expected.revision}"
        )


async def drill_etcd(
    store: ObjectStore,
    manifest: Manifest,
    keyring: crypto.Keyring | None,
    scratch: Path,
    bin_dir: Path | None,
) -> tuple[int, int]:
    if manifest.kind != "etcd" or manifest.etcd is None:
        raise errors.DrillCheckFailed(
            "RestoreFailed", f"the backup is of kind {manifest.kind!r}, not an etcd snapshot"
        )
    snapshot = scratch / "snapshot.db"
    await artifacts.download(store, manifest.ref, snapshot, keyring)
    result = await restore_drill(snapshot, scratch, None, bin_dir=bin_dir)
    expected = manifest.etcd
    if expected.revision_exact:
        if result.revision != expected.revision:
            raise errors.DrillCheckFailed(
                "RevisionMismatch",
                f"the restored etcd is at revision {result.revision}; the manifest recorded "
                f"{expected.revision}",
            )
        if result.key_count != expected.key_count:
            raise errors.DrillCheckFailed(
                "KeyCountMismatch",
                f"the restored etcd holds {result.key_count} keys; the manifest recorded "
                f"{expected.key_count}",
            )
    elif result.revision < expected.revision:
        raise errors.DrillCheckFailed(
            "RevisionMismatch",
            f"the restored etcd is at revision {result.revision}, older than the manifest's "
            f"{expected.revision}",
        )
    return result.revision, result.key_count
