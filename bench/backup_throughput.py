"""Backup throughput: etcd snapshot -> S3 (SeaweedFS), plain and encrypted, and restore time.

Starts a real etcd (client mTLS) and SeaweedFS on loopback, fills etcd with SIZE MiB of random
values, then runs each measurement in a fresh child process so its peak RSS (ru_maxrss) is the
pipeline's own. Prints figures; asserts nothing.

    .venv/bin/python bench/backup_throughput.py [--size-mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.backup.drills.etcd import restore_drill  # noqa: E402
from services.backup.snapshots.etcd import EtcdEndpoint, EtcdSnapshot  # noqa: E402
from services.backup.stores import artifacts, crypto  # noqa: E402
from services.backup.stores.layout import new_ref, parse_ref  # noqa: E402
from services.backup.stores.s3 import S3Config, S3Store  # noqa: E402
from tests.support.etcd import EtcdServer, start_etcd  # noqa: E402
from tests.support.s3 import SeaweedS3, start_seaweed  # noqa: E402

VALUE_SIZE = 256 * 1024


def fill(server: EtcdServer, size_mib: int) -> None:
    count = size_mib * (1 << 20) // VALUE_SIZE

    def put(batch: range) -> None:
        with server.client(timeout=60) as client:
            for i in batch:
                client.post(
                    "/v3/kv/put",
                    json={
                        "key": base64.b64encode(f"/registry/bench/{i:08}".encode()).decode(),
                        "value": base64.b64encode(os.urandom(VALUE_SIZE)).decode(),
                    },
                ).raise_for_status()

    step = max(1, count // 8)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(put, [range(i, min(i + step, count)) for i in range(0, count, step)]))


async def child_backup(spec: dict[str, object]) -> dict[str, object]:
    store = S3Store(S3Config.model_validate(spec["s3"]))
    keyring = (
        crypto.Keyring.from_encoded(spec["keys"], "bench")  # type: ignore[arg-type]
        if spec["encrypted"]
        else None
    )
    endpoint = EtcdEndpoint(**{k: v.encode() if k != "url" else v for k, v in spec["etcd"].items()})  # type: ignore[union-attr]
    snapshot = EtcdSnapshot(endpoint, transport=spec["transport"])  # type: ignore[arg-type]
    began = time.perf_counter()
    manifest = await artifacts.write_backup(
        store,
        new_ref("bench", datetime.now(UTC)),
        "etcd",
        snapshot.chunks(),
        keyring=keyring,
        details=snapshot.details,
        verify=bool(spec["verify"]),
    )
    seconds = time.perf_counter() - began
    await store.close()
    return {"ref": str(manifest.ref), "bytes": manifest.plaintext_size, "seconds": seconds}


async def child_restore(spec: dict[str, object]) -> dict[str, object]:
    store = S3Store(S3Config.model_validate(spec["s3"]))
    keyring = (
        crypto.Keyring.from_encoded(spec["keys"], "bench")  # type: ignore[arg-type]
        if spec["encrypted"]
        else None
    )
    scratch = Path(str(spec["scratch"]))
    began = time.perf_counter()
    manifest = await artifacts.download(
        store, parse_ref(str(spec["ref"])), scratch / "snapshot.db", keyring
    )
    downloaded = time.perf_counter() - began
    result = await restore_drill(scratch / "snapshot.db", scratch, manifest.etcd)
    await store.close()
    return {
        "bytes": manifest.plaintext_size,
        "download_seconds": downloaded,
        "restore_and_drill_seconds": result.seconds,
        "seconds": time.perf_counter() - began,
    }


def run_child(kind: str, spec: dict[str, object]) -> dict[str, object]:
    if os.environ.get("NEST_BENCH_CHILD_SCRIPT"):
        subprocess.run(
            [sys.executable, os.environ["NEST_BENCH_CHILD_SCRIPT"]],
            input=json.dumps(spec).encode(),
            check=False,
            cwd=ROOT,
        )
    output = subprocess.run(
        [sys.executable, __file__, "--child", kind],
        input=json.dumps(spec).encode(),
        capture_output=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(output.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def high_water_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries a forking parent's peak
    over fork and execve into the child's ru_maxrss, so a child of this (~110 MiB) parent
    could never report less than the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(kind: str) -> None:
    spec = json.loads(sys.stdin.read())
    baseline = high_water_mib()
    traced = os.environ.get("NEST_BENCH_TRACEMALLOC") == "1"
    if traced:
        import tracemalloc

        tracemalloc.start(8)
    result = asyncio.run(child_backup(spec) if kind == "backup" else child_restore(spec))
    result["peak_rss_mib"] = high_water_mib()
    result["imports_rss_mib"] = baseline
    if traced:
        result["traced_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--child")
    parser.add_argument("--upload-concurrency", type=int, default=2)
    parser.add_argument("--part-mib", type=int, default=8)
    parser.add_argument(
        "--scenarios",
        default="all",
        help="comma list of transport-plain|encrypted-verify|noverify, e.g. grpc-plain-verify",
    )
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="nest-bench-") as directory:
        root = Path(directory)
        s3: SeaweedS3 = start_seaweed(root / "seaweed")
        etcd = start_etcd(root / "etcd", quota_bytes=8 << 30)
        try:
            began = time.perf_counter()
            fill(etcd, args.size_mib)
            with etcd.client() as client:
                status = client.post("/v3/maintenance/status", json={}).json()
            print(
                f"etcd filled: db size {int(status['dbSize']) / 2**20:.0f} MiB "
                f"in {time.perf_counter() - began:.1f} s"
            )
            bucket = s3.new_bucket()
            spec: dict[str, object] = {
                "s3": {
                    "endpoint_url": s3.endpoint,
                    "bucket": bucket,
                    "prefix": "bench",
                    "access_key_id": s3.access_key,
                    "secret_access_key": s3.secret_key,
                    "path_style": True,
                    "upload_concurrency": args.upload_concurrency,
                    "part_size": args.part_mib << 20,
                },
                "etcd": {
                    "url": etcd.url,
                    "ca_pem": etcd.tls.ca_pem.decode(),
                    "cert_pem": etcd.tls.client_cert_pem.decode(),
                    "key_pem": etcd.tls.client_key_pem.decode(),
                },
                "keys": {"bench": crypto.generate_key()},
            }
            scenarios = [
                ("grpc", False, False),
                ("grpc", False, True),
                ("grpc", True, False),
                ("grpc", True, True),
                ("gateway", True, True),
            ]
            if args.scenarios != "all":
                wanted = set(args.scenarios.split(","))
                scenarios = [
                    (t, e, v)
                    for t, e, v in scenarios
                    if f"{t}-{'encrypted' if e else 'plain'}-{'verify' if v else 'noverify'}"
                    in wanted
                ]
            refs: dict[bool, str] = {}
            for transport, encrypted, verify in scenarios:
                label = "encrypted" if encrypted else "plain"
                result = run_child(
                    "backup",
                    {**spec, "encrypted": encrypted, "verify": verify, "transport": transport},
                )
                refs[encrypted] = str(result["ref"])
                mb = int(result["bytes"]) / 1e6  # type: ignore[call-overload]
                print(
                    f"backup  {transport:7} {label:9} verify={'on ' if verify else 'off'} "
                    f"{mb:7.1f} MB in {result['seconds']:.2f} s = "
                    f"{mb / float(result['seconds']):6.1f} MB/s, "  # type: ignore[arg-type]
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB "
                    f"(after imports {result['imports_rss_mib']:.0f} MiB"
                    + (
                        f", Python peak {result['traced_peak_mib']:.0f} MiB)"
                        if "traced_peak_mib" in result
                        else ")"
                    )
                )
            for encrypted, ref in refs.items():
                label = "encrypted" if encrypted else "plain"
                scratch = root / f"restore-{label}"
                scratch.mkdir()
                restored = run_child(
                    "restore", {**spec, "encrypted": encrypted, "ref": ref, "scratch": str(scratch)}
                )
                print(
                    f"restore {label:9} download+verify {restored['download_seconds']:.2f} s, "
                    "etcdutl restore + scratch etcd check "
                    f"{restored['restore_and_drill_seconds']:.2f} s, "
                    f"total {restored['seconds']:.2f} s, "
                    f"peak RSS {restored['peak_rss_mib']:.0f} MiB"
                )
        finally:
            etcd.stop()
            s3.stop()


if __name__ == "__main__":
    main()
