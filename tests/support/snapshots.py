"""Real etcd snapshots for restore tests: an etcd with known keys saved by etcdctl, and a
plain HTTP server serving a directory (query strings ignored), on loopback unless told."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.etcd import EtcdServer, all_keys, put_keys, start_etcd


@dataclass(frozen=True)
class Snapshot:
    path: Path
    revision: int
    keys: dict[bytes, bytes]


def save_snapshot(server: EtcdServer, path: Path) -> None:
    """`etcdctl snapshot save` from `server` into `path`."""
    tls = server.root / "ctl-tls"
    tls.mkdir(exist_ok=True)
    files = {}
    for name, data in (
        ("ca.crt", server.tls.ca_pem),
        ("tls.crt", server.tls.client_cert_pem),
        ("tls.key", server.tls.client_key_pem),
    ):
        (tls / name).write_bytes(data)
        files[name] = str(tls / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    subprocess.run(
        [
            str(server.bin_dir / "etcdctl"),
            f"--endpoints={server.url}",
            f"--cacert={files['ca.crt']}",
            f"--cert={files['tls.crt']}",
            f"--key={files['tls.key']}",
            "snapshot",
            "save",
            str(path),
        ],
        check=True,
        capture_output=True,
        env=env,
    )


def make_snapshot(root: Path, keys: int = 50) -> Snapshot:
    """A snapshot of a fresh etcd holding `keys` keys and some history."""
    server = start_etcd(root / "etcd")
    try:
        put_keys(server, {f"/registry/k{i}".encode(): f"v{i}".encode() for i in range(keys)})
        put_keys(server, {b"/registry/k0": b"changed"})
        with server.client() as client:
            revision, found = all_keys(client)
        path = root / "snapshot.db"
        save_snapshot(server, path)
    finally:
        server.stop()
    return Snapshot(path, revision, found)


def restored_keys(root: Path, data_dir: Path, name: str) -> tuple[int, dict[bytes, bytes]]:
    """(revision, keys) of a real etcd started on a restored data dir."""
    server = start_etcd(root, data_dir=data_dir, name=name)
    try:
        with server.client() as client:
            return all_keys(client)
    finally:
        server.stop()


@contextlib.contextmanager
def serve_directory(directory: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """`http://<host>:<port>` serving the files of `directory` (a restore Job's pod in the
    test cluster reaches the host at a harness node's address, never at 127.0.0.1)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
