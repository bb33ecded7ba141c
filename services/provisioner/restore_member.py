"""The command of a restore Job: put one etcd member's data back from a verified snapshot.

`python -m services.provisioner.restore_member --url URL --sha256 HEX --data-dir
/var/lib/etcd/data --name etcd-0 --initial-cluster ... --initial-advertise-peer-urls ...
--initial-cluster-token ... --restore-id ID` runs in a Job that mounts the member's volume
(the PersistentVolumeClaim `data-etcd-<n>`) while etcd is scaled to zero. The URL may also
come from the environment (`NEST_RESTORE_URL`), so the token in it stays out of the Job's spec.

Idempotent and crash-safe: every step leaves a state the next run recognises, and a rerun
after a crash anywhere finishes the same restore. Everything happens on the volume itself
(`<volume>` = the data dir's parent), so every rename is atomic:

1. `<volume>/.nest-restore` names the restore id that was completed: if it is this one, exit 0.
2. Download into `<volume>/.nest-restore-<id>/snapshot.db.part`, fsync, check its sha256,
   rename to `snapshot.db` (an existing `snapshot.db` is checked again, and fetched anew if it
   does not match).
3. `etcdutl snapshot restore` (always with etcd's own hash check) into `restoring/`, which is
   removed first if a crash left it half written, then renamed to `restored/`.
4. Write `swapping`, move the live data dir aside as `<volume>/pre-restore-<id>` and rename
   `restored/` into its place.
5. Write the marker (temp file, fsync, rename, fsync the directory), remove the work dir and
   older `pre-restore-*` directories; the newest previous data stays for a manual rollback.

The etcdutl binary is `NEST_ETCDUTL` if set, else `etcdutl` on PATH. Exit status 0 on
success; 1 with one line on stderr on any failure (the Job then fails after its retries).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MARKER = ".nest-restore"
WORK_PREFIX = ".nest-restore-"
ASIDE_PREFIX = "pre-restore-"
CHUNK = 1 << 20
RESTORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RestoreFailed(Exception):
    """The member could not be restored; the message says why."""


@dataclass(frozen=True)
class MemberRestore:
    """What one member's restore needs."""

    url: str
    sha256: str
    data_dir: Path
    name: str
    initial_cluster: str
    initial_advertise_peer_urls: str
    initial_cluster_token: str
    restore_id: str
    etcdutl: str

    @property
    def volume(self) -> Path:
        return self.data_dir.parent

    @property
    def marker(self) -> Path:
        return self.volume / MARKER

    @property
    def work(self) -> Path:
        return self.volume / f"{WORK_PREFIX}{self.restore_id}"

    @property
    def aside(self) -> Path:
        return self.volume / f"{ASIDE_PREFIX}{self.restore_id}"


Fetch = Callable[[str], BinaryIO]
"""Opens the snapshot URL for reading (a seam for the HTTP client, not for the checks)."""


def _open_url(url: str) -> BinaryIO:
    if not url.startswith(("http://", "https://")):
        raise RestoreFailed("the snapshot URL must be http or https")
    response: BinaryIO = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - scheme checked
    return response


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def completed(member: MemberRestore) -> bool:
    """Whether this restore already finished on this volume."""
    try:
        return member.marker.read_text().strip() == member.restore_id
    except FileNotFoundError:
        return False


def fetch_snapshot(member: MemberRestore, fetch: Fetch = _open_url) -> Path:
    """The verified snapshot in the work dir, downloaded unless a verified copy is there."""
    snapshot = member.work / "snapshot.db"
    if snapshot.exists():
        if sha256_of(snapshot) == member.sha256:
            return snapshot
        snapshot.unlink()
    partial = member.work / "snapshot.db.part"
    try:
        source = fetch(member.url)
    except RestoreFailed:
        raise
    except Exception as exc:  # urllib raises many kinds; the URL itself is never printed
        raise RestoreFailed(f"downloading the snapshot failed: {type(exc).__name__}") from None
    digest = hashlib.sha256()
    try:
        with source, partial.open("wb") as out:
            while block := source.read(CHUNK):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise RestoreFailed(f"downloading the snapshot failed: {type(exc).__name__}") from None
    if digest.hexdigest() != member.sha256:
        partial.unlink()
        raise RestoreFailed(
            f"the downloaded snapshot's sha256 {digest.hexdigest()} is not the expected "
            f"{member.sha256}"
        )
    os.replace(partial, snapshot)
    _fsync_dir(member.work)
    return snapshot


def restore_into_work(member: MemberRestore, snapshot: Path) -> Path:
    """`etcdutl snapshot restore` into `restoring/`, renamed to `restored/` once complete."""
    restored = member.work / "restored"
    if restored.exists():
        return restored
    restoring = member.work / "restoring"
    if restoring.exists():
        shutil.rmtree(restoring)
    command = [
        member.etcdutl,
        "snapshot",
        "restore",
        str(snapshot),
        f"--data-dir={restoring}",
        f"--name={member.name}",
        f"--initial-cluster={member.initial_cluster}",
        f"--initial-advertise-peer-urls={member.initial_advertise_peer_urls}",
        f"--initial-cluster-token={member.initial_cluster_token}",
    ]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    try:
        result = subprocess.run(  # fixed argv, no shell
            command, capture_output=True, env=environment, check=False, timeout=3600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RestoreFailed(f"etcdutl snapshot restore could not run: {exc}") from None
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise RestoreFailed(
            f"etcdutl snapshot restore failed: {lines[-1] if lines else result.returncode}"
        )
    os.replace(restoring, restored)
    _fsync_dir(member.work)
    return restored


def swap_in(member: MemberRestore) -> None:
    """Move the live data aside and the restored data into place; safe to repeat."""
    restored = member.work / "restored"
    swapping = member.work / "swapping"
    if not restored.exists():
        if swapping.exists() and member.data_dir.exists():
            return  # the swap finished before a crash
        raise RestoreFailed(f"nothing restored in {member.work} to move into place")
    if not swapping.exists():
        swapping.write_text(member.restore_id)
        _fsync_dir(member.work)
    if member.data_dir.exists():
        if member.aside.exists():
            raise RestoreFailed(
                f"both {member.data_dir} and {member.aside} exist; refusing to overwrite either"
            )
        os.replace(member.data_dir, member.aside)
        _fsync_dir(member.volume)
    os.replace(restored, member.data_dir)
    _fsync_dir(member.volume)


def write_marker(member: MemberRestore) -> None:
    temp = member.volume / f"{MARKER}.tmp"
    with temp.open("w") as handle:
        handle.write(member.restore_id + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, member.marker)
    _fsync_dir(member.volume)


def clean_up(member: MemberRestore) -> None:
    """Remove the work dir and data set aside by earlier restores (this one's stays)."""
    shutil.rmtree(member.work, ignore_errors=True)
    for entry in member.volume.iterdir():
        stale_work = entry.name.startswith(WORK_PREFIX) and entry != member.work
        stale_aside = entry.name.startswith(ASIDE_PREFIX) and entry != member.aside
        if entry.is_dir() and (stale_work or stale_aside):
            shutil.rmtree(entry, ignore_errors=True)


def restore_member(member: MemberRestore, fetch: Fetch = _open_url) -> bool:
    """Run (or finish) the restore; False if it was already complete."""
    if not RESTORE_ID.match(member.restore_id):
        raise RestoreFailed("--restore-id must be 1-128 letters, digits, '.', '_' or '-'")
    if not re.fullmatch(r"[0-9a-f]{64}", member.sha256):
        raise RestoreFailed("--sha256 must be 64 lowercase hex digits")
    if completed(member):
        clean_up(member)
        return False
    member.volume.mkdir(parents=True, exist_ok=True)
    member.work.mkdir(exist_ok=True)
    swapped = (member.work / "swapping").exists() and not (member.work / "restored").exists()
    if not swapped:
        if not (member.work / "restored").exists():
            snapshot = fetch_snapshot(member, fetch)
            restore_into_work(member, snapshot)
        swap_in(member)
    write_marker(member)
    clean_up(member)
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.provisioner.restore_member",
        description="Restore one etcd member's data dir from a snapshot URL (idempotent).",
    )
    parser.add_argument("--url", default=None, help="snapshot URL (default: $NEST_RESTORE_URL)")
    parser.add_argument("--sha256", required=True, help="sha256 of the snapshot")
    parser.add_argument("--data-dir", required=True, type=Path, help="etcd's data dir")
    parser.add_argument("--name", required=True, help="the member's name")
    parser.add_argument("--initial-cluster", required=True)
    parser.add_argument("--initial-advertise-peer-urls", required=True)
    parser.add_argument("--initial-cluster-token", required=True)
    parser.add_argument("--restore-id", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    url = args.url or os.environ.get("NEST_RESTORE_URL")
    if not url:
        print("restore failed: no --url and no NEST_RESTORE_URL", file=sys.stderr)
        return 1
    etcdutl = os.environ.get("NEST_ETCDUTL") or shutil.which("etcdutl")
    if not etcdutl:
        print("restore failed: etcdutl not found (set NEST_ETCDUTL)", file=sys.stderr)
        return 1
    member = MemberRestore(
        url=url,
        sha256=args.sha256.lower(),
        data_dir=args.data_dir,
        name=args.name,
        initial_cluster=args.initial_cluster,
        initial_advertise_peer_urls=args.initial_advertise_peer_urls,
        initial_cluster_token=args.initial_cluster_token,
        restore_id=args.restore_id,
        etcdutl=etcdutl,
    )
    try:
        done = restore_member(member)
    except (RestoreFailed, OSError) as exc:
        print(f"restore failed: {exc}", file=sys.stderr)
        return 1
    state = "restored" if done else "already restored"
    print(f"{member.name}: {state} from snapshot {member.sha256[:16]} ({member.restore_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
