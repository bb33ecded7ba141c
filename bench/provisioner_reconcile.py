"""Provisioner figures: reconcile throughput, intent -> Ready latency, memory per cluster.

    .venv/bin/python bench/provisioner_reconcile.py --clusters 100 1000

This process runs the provisioner (in-process, measured) and an event listener; a child process
runs the emulated management cluster (kmock-based, with the kwok-like controller, so pods are
"ready" the moment they are applied: pod start is excluded) and every tenant API over TLS.
A real nats-server (the embedded one) carries the intents and events. For each run, N reconcile
intents are published at once; a cluster's latency is from its intent's publish to its first
`Ready` status event; throughput is N over the time until the last one is Ready. Memory is the
provisioner process's RSS growth over the run divided by N (everything it keeps per cluster:
records, tenant clients, caches), measured after a GC once every cluster is Ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kmock
import psutil

from libs.common.bus import Bus
from libs.common.contract import Envelope
from libs.common.contract.cluster import ClusterSpec, ReconcileCluster
from libs.common.nats_server import EmbeddedNats
from libs.common.settings import Settings
from tests.support.kube_emulator import TENANT_DOMAIN
from tests.support.kube_harness import (
    fast_config,
    management_cluster,
    reset_buckets,
    tenant_apis,
)


async def serve_emulators(directory: Path) -> None:
    """Child process: the management emulator and the tenant APIs until stdin closes."""
    async with contextlib.AsyncExitStack() as stack:
        management = await stack.enter_async_context(management_cluster(directory))
        tenants = await stack.enter_async_context(
            tenant_apis(management.emulator, directory / "tenants")
        )
        print(json.dumps({"kubeconfig": str(management.kubeconfig), "tenants": tenants.port}))
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run(
    clusters: int, nats_url: str, kubeconfig: Path, data: Path, emulator_pid: int
) -> dict[str, float]:
    from services.provisioner.service import ProvisionerService

    settings = Settings(
        data_dir=data,
        nats_url=nats_url,
        kubeconfig=kubeconfig,
        poll_interval_seconds=0.2,
        resync_interval_seconds=3600,
        reconcile_concurrency=32,
    )
    bus = Bus([nats_url], name="bench")
    await bus.connect()
    await bus.ensure_streams()
    await reset_buckets(bus)
    js = bus.nc.jetstream()
    for stream in ("NEST_INTENTS", "NEST_EVENTS"):
        await js.purge_stream(stream)
    service = ProvisionerService(settings, config=fast_config(settings), first_resync_after=3600)
    provisioner_bus = Bus([nats_url], name="bench-provisioner")
    await provisioner_bus.connect()
    await service.start(provisioner_bus)

    ready_at: dict[str, float] = {}
    done = asyncio.Event()

    async def on_event(msg: object) -> None:
        envelope = Envelope.from_bytes(msg.data)  # type: ignore[attr-defined]
        data = envelope.data
        if data.get("phase") == "Ready" and data["clusterId"] not in ready_at:
            ready_at[data["clusterId"]] = time.perf_counter()
            if len(ready_at) == clusters:
                done.set()

    subscription = await bus.nc.subscribe("nest.event.cluster.status_changed", cb=on_event)
    gc.collect()
    await asyncio.sleep(0.5)
    before = rss()
    me, emulators = psutil.Process(), psutil.Process(emulator_pid)
    cpu_before, emulator_cpu_before = cpu_seconds(me), cpu_seconds(emulators)
    published: dict[str, float] = {}
    run_id = uuid.uuid4().hex[:6]
    start = time.perf_counter()
    for index in range(clusters):
        cluster_id = f"{run_id}-{index}"
        intent = ReconcileCluster(
            cluster_id=cluster_id,
            name=f"b{run_id}-{index}",
            generation=1,
            spec=ClusterSpec.model_validate({"datastore": {"replicas": 1}}),
        )
        published[cluster_id] = time.perf_counter()
        await bus.publish(intent, source="bench", subject=cluster_id)
    try:
        await asyncio.wait_for(done.wait(), timeout=max(120.0, clusters * 0.5))
    except TimeoutError:
        print(f"  only {len(ready_at)}/{clusters} Ready before the timeout", file=sys.stderr)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(me) - cpu_before
    emulator_cpu = cpu_seconds(emulators) - emulator_cpu_before
    gc.collect()
    after = rss()
    latencies = sorted(ready_at[c] - published[c] for c in ready_at)
    passes = service.passes
    await subscription.unsubscribe()
    await service.stop(5)
    await provisioner_bus.close()
    await bus.close()
    return {
        "clusters": clusters,
        "ready": len(ready_at),
        "seconds": elapsed,
        "throughput": len(ready_at) / elapsed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": latencies[int(len(latencies) * 0.95) - 1] if latencies else float("nan"),
        "max": latencies[-1] if latencies else float("nan"),
        "rss_per_cluster_kib": (after - before) / max(1, len(ready_at)) / 1024,
        "passes_per_cluster": passes / clusters,
        "cpu_ms_per_cluster": cpu * 1000 / clusters,
        "emulator_cpu_ms_per_cluster": emulator_cpu * 1000 / clusters,
    }


async def main_async(sizes: list[int]) -> None:
    print(
        f"{'clusters':>8} {'ready':>6} {'seconds':>8} {'clusters/s':>10} "
        f"{'p50 s':>7} {'p95 s':>7} {'max s':>7} {'KiB/cluster':>11} {'passes':>6} "
        f"{'CPU ms/cl':>9} {'emu CPU ms/cl':>13}"
    )
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            # A fresh emulator and NATS per size, so runs do not see each other's clusters.
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(root)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            nats = EmbeddedNats(root / "nats")
            nats.start()
            try:
                assert child.stdout is not None
                endpoints = json.loads(child.stdout.readline())
                pattern = re.compile(rf".*\.{re.escape(TENANT_DOMAIN)}")
                async with kmock.AiohttpInterceptor("127.0.0.1", endpoints["tenants"], pattern):
                    figures = await run(
                        size, nats.url, Path(endpoints["kubeconfig"]), root, child.pid
                    )
                print(
                    f"{figures['clusters']:>8.0f} {figures['ready']:>6.0f} "
                    f"{figures['seconds']:>8.2f} {figures['throughput']:>10.1f} "
                    f"{figures['p50']:>7.2f} {figures['p95']:>7.2f} {figures['max']:>7.2f} "
                    f"{figures['rss_per_cluster_kib']:>11.0f} "
                    f"{figures['passes_per_cluster']:>6.1f} "
                    f"{figures['cpu_ms_per_cluster']:>9.0f} "
                    f"{figures['emulator_cpu_ms_per_cluster']:>13.0f}",
                    flush=True,
                )
            finally:
                nats.stop()
                if child.stdin is not None:
                    child.stdin.close()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve_emulators(args.serve))
    else:
        asyncio.run(main_async(args.clusters))


if __name__ == "__main__":
    main()
