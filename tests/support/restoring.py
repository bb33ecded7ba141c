"""What the restore and etcd-access tests observe in the real management cluster: a hosted
cluster's own etcd, reached with the client certificate the provisioner's `etcd_client` RPC
issues (as the backup service reaches it); the workloads, Jobs and pods of a cluster's
namespace as the API server reports them; the volume directory behind a claim; the output of
a restore Job's pod; and deleting a cluster at a test's end."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from libs.common.bus import Bus
from libs.common.contract.etcd_access import ETCD_CLIENT_RPC_SUBJECT
from tests.support.kube.api import Informer, Obj, running
from tests.support.kube_harness import Management

ALL_KEYS = base64.b64encode(b"\0").decode()


# The hosted cluster's etcd


@dataclass(frozen=True)
class EtcdAccess:
    """The `etcd_client` RPC's answer: the etcd URL (a name of the management cluster's DNS)
    and a client certificate from the cluster's etcd CA."""

    url: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    expires_at: str

    @classmethod
    async def issue(
        cls, bus: Bus, cluster_id: str, requester: str = "test", ttl_seconds: int = 600
    ) -> EtcdAccess:
        answer = await bus.request(
            ETCD_CLIENT_RPC_SUBJECT,
            {"clusterId": cluster_id, "requester": requester, "ttlSeconds": ttl_seconds},
        )
        return cls(
            url=answer["url"],
            ca_pem=answer["caPem"].encode(),
            cert_pem=answer["certPem"].encode(),
            key_pem=answer["keyPem"].encode(),
            expires_at=answer["expiresAt"],
        )

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None, self.url
        return host

    def context(self, *, client_certificate: bool = True) -> ssl.SSLContext:
        """Trusting only the cluster's etcd CA; presenting the issued certificate unless not."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        if client_certificate:
            with tempfile.TemporaryDirectory(prefix="nest-test-etcd-") as directory:
                cert, key = Path(directory) / "tls.crt", Path(directory) / "tls.key"
                cert.write_bytes(self.cert_pem)
                key.write_bytes(self.key_pem)
                key.chmod(0o600)
                context.load_cert_chain(cert, key)
        return context

    async def post(
        self,
        management: Management,
        path: str,
        body: dict[str, Any],
        *,
        client_certificate: bool = True,
    ) -> httpx.Response:
        """POST to etcd's HTTP gateway at the address the cluster's DNS gives the URL's name,
        verifying the server certificate for that name (as a client inside the cluster would)."""
        address = management.cluster.resolve(self.host)
        assert address is not None, f"the cluster's DNS has no {self.host}"
        port = urlsplit(self.url).port
        context = self.context(client_certificate=client_certificate)
        async with httpx.AsyncClient(verify=context, timeout=5.0) as client:
            return await client.post(
                f"https://{address}:{port}{path}",
                json=body,
                extensions={"sni_hostname": self.host},
            )

    async def keys(
        self, management: Management, *, revision: int | None = None
    ) -> tuple[int, dict[bytes, bytes]]:
        """(etcd's current revision, every key and value as of `revision`, default now)."""
        body: dict[str, Any] = {"key": ALL_KEYS, "range_end": ALL_KEYS}
        if revision is not None:
            body["revision"] = revision
        response = await self.post(management, "/v3/kv/range", body)
        assert response.status_code == 200, response.text
        found = response.json()
        keys = {
            base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", ""))
            for kv in found.get("kvs", [])
        }
        return int(found["header"]["revision"]), keys

    async def members(self, management: Management) -> list[str]:
        response = await self.post(management, "/v3/cluster/member/list", {})
        assert response.status_code == 200, response.text
        return sorted(m.get("name", "") for m in response.json()["members"])


async def eventually_keys(
    bus: Bus,
    management: Management,
    cluster_id: str,
    *,
    revision: int,
    timeout: float = 60.0,
) -> tuple[int, dict[bytes, bytes]]:
    """The cluster's etcd keys as of `revision`, once its etcd answers (a member that just
    started, or the cluster's DNS catching up with its new pod IP, take a moment)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            access = await EtcdAccess.issue(bus, cluster_id)
            return await access.keys(management, revision=revision)
        except (httpx.HTTPError, AssertionError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


# A cluster's namespace as the API server reports it


class NamespaceWatch:
    """The Deployments, StatefulSets, Jobs and pods of one namespace, from watches on the real
    API server: every change of a workload's `spec.replicas` (with the resourceVersion of the
    change: the management cluster has one etcd, so its revisions order changes of different
    kinds), every Job and every pod as last seen (deleted ones included)."""

    def __init__(self, management: Management, namespace: str) -> None:
        self.namespace = namespace
        self._replicas: dict[str, int] = {}
        self._scales: list[tuple[int, str, int]] = []
        self.jobs: dict[str, Obj] = {}
        self.pods: dict[str, Obj] = {}
        api = management.api
        self._informers = [
            Informer(api, f"/apis/apps/v1/namespaces/{namespace}/deployments", self._workload),
            Informer(api, f"/apis/apps/v1/namespaces/{namespace}/statefulsets", self._workload),
            Informer(api, f"/apis/batch/v1/namespaces/{namespace}/jobs", self._job),
            Informer(api, f"/api/v1/namespaces/{namespace}/pods", self._pod),
        ]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NamespaceWatch]:
        async with running(*self._informers):
            yield self

    async def _workload(self, kind: str, obj: Obj) -> None:
        if kind == "DELETED":
            return
        plural = "deployments" if obj.get("kind") == "Deployment" else "statefulsets"
        replicas = int(obj["spec"].get("replicas", 1))
        previous = self._replicas.get(plural)
        self._replicas[plural] = replicas
        if previous is not None and previous != replicas:
            version = int(obj["metadata"]["resourceVersion"])
            self._scales.append((version, plural, replicas))

    async def _job(self, kind: str, obj: Obj) -> None:
        self.jobs[obj["metadata"]["name"]] = obj

    async def _pod(self, kind: str, obj: Obj) -> None:
        self.pods[obj["metadata"]["name"]] = obj

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Until `check()` holds for what the watches delivered so far (a watch event may arrive
        after the NATS event of the same change)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():
            if asyncio.get_running_loop().time() > deadline:
                summary = {job: self.exit_codes(job) for job in self.jobs}
                raise AssertionError(
                    f"{what}: not within {timeout}s; replicas set: {self.scales()}; "
                    f"exit codes of the Jobs' pods: {summary}"
                )
            await asyncio.sleep(0.05)

    def scales(self) -> list[tuple[str, int]]:
        """(plural, replicas) of every replica count set since the watch started, in order."""
        return [(plural, replicas) for _, plural, replicas in sorted(self._scales)]

    def job_pods(self, job: str) -> list[Obj]:
        """The pods the Job controller made for `job`, oldest first."""
        found = [
            pod
            for pod in self.pods.values()
            if (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == job
        ]
        return sorted(found, key=lambda pod: pod["metadata"]["creationTimestamp"])

    def exit_codes(self, job: str) -> list[int | None]:
        """The exit code of each of the Job's pods (None: it has not terminated)."""
        codes: list[int | None] = []
        for pod in self.job_pods(job):
            statuses = (pod.get("status") or {}).get("containerStatuses") or []
            terminated = [
                (s.get("state") or {}).get("terminated") for s in statuses if s["name"] == "restore"
            ]
            codes.append(int(terminated[0]["exitCode"]) if terminated and terminated[0] else None)
        return codes


def pod_log(management: Management, namespace: str, pod: str, container: str) -> str:
    """What a really run container printed (the harness keeps it after the pod is gone)."""
    path = management.cluster.directory / "logs" / namespace / pod / f"{container}.log"
    return path.read_text(errors="replace") if path.exists() else ""


async def claim_directory(management: Management, namespace: str, claim: str) -> Path:
    """The host directory of the PersistentVolume bound to `claim` (the harness provisions
    volumes as host paths)."""
    found = await management.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
    assert found is not None, f"no claim {claim} in {namespace}"
    volume = await management.get(f"/api/v1/persistentvolumes/{found['spec']['volumeName']}")
    assert volume is not None
    return Path(volume["spec"]["hostPath"]["path"])


async def restore_objects(management: Management, namespace: str) -> list[str]:
    """The restore Jobs and Secrets left in `namespace`."""
    jobs = await management.list(f"/apis/batch/v1/namespaces/{namespace}/jobs")
    secrets = await management.list(f"/api/v1/namespaces/{namespace}/secrets")
    return [f"jobs/{j['metadata']['name']}" for j in jobs] + [
        f"secrets/{s['metadata']['name']}" for s in secrets if "restore" in s["metadata"]["name"]
    ]


async def delete_cluster(
    api: httpx.AsyncClient, management: Management, cluster_id: str, namespace: str
) -> None:
    """Delete the cluster through the API and wait until its namespace is on its way out, so
    the shared management cluster does not keep its real pods; the namespace is deleted
    directly if the provisioner did not get to it (a failed test)."""
    await api.delete(f"/api/v1/clusters/{cluster_id}")
    path = f"/api/v1/namespaces/{namespace}"
    deadline = asyncio.get_running_loop().time() + 30.0
    while asyncio.get_running_loop().time() < deadline:
        found = await management.get(path)
        if found is None or found["metadata"].get("deletionTimestamp"):
            return
        await asyncio.sleep(0.2)
    await management.api.delete(path)
