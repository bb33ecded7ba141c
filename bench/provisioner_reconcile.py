"""Provisioner figures on a real management cluster: reconcile throughput, intent -> ready
latency, API server requests and provisioner CPU per cluster.

    .venv/bin/python bench/provisioner_reconcile.py --clusters 100 --real 1 5

Each run starts a fresh management cluster of the test harness (real etcd, kube-apiserver,
kube-controller-manager and kube-scheduler; `tests/support/kube`, start-up timed), a real
nats-server, and the provisioner as its own process (`nest run provisioner`, measured with
psutil) with the Helm chart's ServiceAccount token, through a counting proxy in front of the
API server (`tests.support.kube.proxy`; the provisioner's requests only).

- `--clusters N`: N reconcile intents published at once, pods **marked ready** by the harness
  (as kwok does: pod start excluded). No hosted API answers for such a cluster, so its latency is
  intent -> the first status event with everything in the management cluster ready
  (`DatastoreReady`, `ControlPlaneReady`, `EndpointReady`); the add-on step is measured below.
- `--real K`: K clusters (1 control-plane replica, 1 etcd member) whose control planes **run
  for real**, published at once; latency is intent -> `Ready` (add-ons applied to the real hosted
  API), which includes starting etcd and kube-apiserver on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from libs.common.bus import Bus
from libs.common.contract import Envelope
from libs.common.contract.cluster import ClusterSpec, ReconcileCluster
from libs.common.nats_server import EmbeddedNats
from tests.support.kube import harness, identities
from tests.support.kube.agent import MODE_LABEL
from tests.support.kube.proxy import KubeProxy
from tests.support.kube.session import ManagementCluster

MANAGEMENT_READY = ("DatastoreReady", "ControlPlaneReady", "EndpointReady")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def management_ready(data: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in data.get("conditions") or []}
    return all(conditions.get(kind) == "True" for kind in MANAGEMENT_READY)


async def run(cluster: ManagementCluster, count: int, real: bool, root: Path) -> dict[str, float]:
    nats = EmbeddedNats(root / f"nats-{uuid.uuid4().hex[:4]}")
    nats.start()
    proxy = KubeProxy(cluster, root / "proxy")
    await proxy.start()
    kubeconfig = await identities.provisioner_kubeconfig(
        cluster, root / "provisioner.kubeconfig", server=proxy.url
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEST_")},
        "NEST_DATA_DIR": str(root / "data"),
        "NEST_NATS_URL": nats.url,
        "NEST_KUBECONFIG": str(kubeconfig),
        "NEST_NODE_ADDRESS": cluster.node_ips[0],
        "NEST_RESYNC_INTERVAL_SECONDS": "3600",
        "NEST_RECONCILE_CONCURRENCY": "32",
        "NEST_LOG_LEVEL": "WARNING",
    }
    bus = Bus([nats.url], name="bench")
    await bus.connect()
    await bus.ensure_streams()
    log = (root / "provisioner.log").open("ab")
    child = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", "provisioner"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    provisioner = psutil.Process(child.pid)
    reached: dict[str, float] = {}
    done = asyncio.Event()

    async def on_event(msg: Any) -> None:
        data = Envelope.from_bytes(msg.data).data
        cluster_id = data["clusterId"]
        if os.environ.get("BENCH_TRACE"):
            conditions = {c["type"]: c["status"] for c in data.get("conditions") or []}
            at = time.perf_counter() - start
            print(f"  {at:6.2f} {cluster_id} {data.get('phase')} {conditions}")
        hit = data.get("phase") == "Ready" if real else management_ready(data)
        if hit and cluster_id not in reached:
            reached[cluster_id] = time.perf_counter()
            if len(reached) == count:
                done.set()

    subscription = await bus.nc.subscribe("nest.event.cluster.status_changed", cb=on_event)
    await asyncio.sleep(3.0)  # the provisioner connects, opens its watches
    proxy.requests.clear()
    cpu_before = cpu_seconds(provisioner)
    rss_before = provisioner.memory_info().rss
    published: dict[str, float] = {}
    run_id = uuid.uuid4().hex[:5]
    spec: dict[str, Any] = {"datastore": {"replicas": 1}}
    if real:
        spec["controlPlane"] = {"replicas": 1}
    start = time.perf_counter()
    for index in range(count):
        cluster_id = f"{run_id}-{index}"
        intent = ReconcileCluster(
            cluster_id=cluster_id,
            name=f"b{run_id}-{index}",
            generation=1,
            labels={MODE_LABEL: "real"} if real else {},
            spec=ClusterSpec.model_validate(spec),
        )
        published[cluster_id] = time.perf_counter()
        await bus.publish(intent, source="bench", subject=cluster_id)
    try:
        await asyncio.wait_for(done.wait(), timeout=max(300.0, count * 3.0))
    except TimeoutError:
        print(f"  only {len(reached)}/{count} reached before the timeout", file=sys.stderr)
    elapsed = time.perf_counter() - start
    # Let the passes that follow readiness finish before CPU and requests are read.
    await asyncio.sleep(5.0)
    cpu = cpu_seconds(provisioner) - cpu_before
    rss_after = provisioner.memory_info().rss
    requests = sum(proxy.requests.values())
    latencies = sorted(reached[c] - published[c] for c in reached)
    await subscription.unsubscribe()
    child.terminate()
    child.wait(30)
    await bus.close()
    await proxy.stop()
    nats.stop()
    return {
        "clusters": count,
        "reached": len(reached),
        "seconds": elapsed,
        "throughput": len(reached) / elapsed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("nan"),
        "max": latencies[-1] if latencies else float("nan"),
        "requests_per_cluster": requests / count,
        "cpu_ms_per_cluster": cpu * 1000 / count,
        "rss_kib_per_cluster": (rss_after - rss_before) / count / 1024,
    }


async def main_async(sizes: list[int], real_sizes: list[int], keep: Path | None) -> None:
    header = (
        f"{'pods':>5} {'clusters':>8} {'reached':>7} {'seconds':>8} {'clusters/s':>10} "
        f"{'p50 s':>7} {'p99 s':>7} {'max s':>7} {'req/cl':>7} {'CPU ms/cl':>9} {'KiB/cl':>7}"
    )
    rows = []
    for real, count in [(False, n) for n in sizes] + [(True, n) for n in real_sizes]:
        with tempfile.TemporaryDirectory(prefix="nest-bench-") as tmp:
            root = Path(tmp)
            if keep is not None:
                root = keep / f"{'real' if real else 'fake'}-{count}"
                root.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            state = await asyncio.to_thread(
                harness.start_background, root / "kube", probe_scale=1.0, echo=False
            )
            startup = time.perf_counter() - started
            cluster = ManagementCluster(
                directory=root / "kube",
                kubeconfig=Path(state.kubeconfig),
                url=state.url,
                version=state.version,
                node_names=tuple(state.node_names),
                node_ips=tuple(state.node_ips),
                hosts=Path(state.hosts),
                etcd_url=state.etcd_url,
                bridge=state.bridge,
            )
            print(f"management cluster v{state.version} up in {startup:.1f}s", flush=True)
            try:
                figures = await run(cluster, count, real, root)
            finally:
                await asyncio.to_thread(harness.stop_background, root / "kube")
        rows.append(
            f"{'real' if real else 'fake':>5} {figures['clusters']:>8.0f} "
            f"{figures['reached']:>7.0f} {figures['seconds']:>8.1f} "
            f"{figures['throughput']:>10.2f} {figures['p50']:>7.2f} {figures['p99']:>7.2f} "
            f"{figures['max']:>7.2f} {figures['requests_per_cluster']:>7.1f} "
            f"{figures['cpu_ms_per_cluster']:>9.0f} {figures['rss_kib_per_cluster']:>7.0f}"
        )
        print(header)
        print("\n".join(rows), flush=True)
    print(json.dumps({"load_average": os.getloadavg()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", type=int, nargs="*", default=[100])
    parser.add_argument("--real", type=int, nargs="*", default=[1, 5])
    parser.add_argument("--keep", type=Path, help="work (and keep logs) in this directory")
    args = parser.parse_args()
    asyncio.run(main_async(args.clusters, args.real, args.keep))


if __name__ == "__main__":
    main()
