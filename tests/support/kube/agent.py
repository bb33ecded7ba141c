"""The harness's node agents and the small controllers a bare management cluster lacks.

- **Nodes**: registered with the real API (Ready, capacity, addresses on the harness bridge),
  their Leases in `kube-node-lease` renewed every 10 s, so the node lifecycle controller keeps
  them Ready. Pods the scheduler binds to them are run by `pods.Pod`, in the mode their
  namespace asks for: label `harness.nest.test/pods` = `fake` (default) | `real`, and
  annotation `harness.nest.test/hold: "true"` to hold new pods Pending.
- **Volumes**: a default StorageClass `standard` (provisioner `harness.nest.test/local`); a
  claim of that class gets a hostPath PersistentVolume under the harness directory, bound by the
  real PV controller; a released volume is deleted with its directory.
- **Services**: as kube-proxy and a load-balancer controller would, TCP proxies on the bridge
  forward a Service's cluster IP, NodePorts (on every node address) and load-balancer address
  (allocated from the bridge, written to `status.loadBalancer`) to its ready endpoints.
- **DNS**: a hosts file per real pod (`<pod>/etc/hosts`, the pod's own names first) and one for
  the host (`etc/hosts`), from Services and EndpointSlices: `<svc>.<ns>.svc[.cluster.local]`
  and, for headless Services, `<hostname>.<svc>.<ns>.svc[.cluster.local]` per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.kube import pods
from tests.support.kube.api import Api, ApiError, Informer, Obj
from tests.support.kube.network import Bridge

log = logging.getLogger(__name__)

MODE_LABEL = "harness.nest.test/pods"
HOLD_ANNOTATION = "harness.nest.test/hold"
PROVISIONER = "harness.nest.test/local"
STORAGE_CLASS = "standard"
DNS_DOMAIN = "cluster.local"
LEASE_SECONDS = 40


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class AgentConfig:
    root: Path
    nodes: list[str]
    node_ips: list[str]
    default_mode: str = pods.FAKE
    probe_scale: float = 1.0
    kubelet_version: str = "v1.37.2"
    apiserver_port: int = 0
    """The management API server's port on 127.0.0.1; also served on the first node address,
    which is the API server's advertise address (the `kubernetes` Service's endpoint)."""


class Agent:
    def __init__(self, api: Api, bridge: Bridge, config: AgentConfig) -> None:
        self.api = api
        self.bridge = bridge
        self.config = config
        self.etc = config.root / "etc"
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text(
            f"search svc.{DNS_DOMAIN} {DNS_DOMAIN}\nnameserver 127.0.0.1\noptions ndots:1\n"
        )
        self.runtime = pods.Runtime(
            api=api,
            bridge=bridge,
            root=config.root,
            etc=self.etc,
            probe_scale=config.probe_scale,
            node_ips=dict(zip(config.nodes, config.node_ips, strict=True)),
        )
        self.pods: dict[str, pods.Pod] = {}
        self.namespaces = Informer(api, "/api/v1/namespaces", self._on_namespace)
        self.pod_informer = Informer(api, "/api/v1/pods", self._on_pod)
        self.claims = Informer(api, "/api/v1/persistentvolumeclaims", self._on_claim)
        self.volumes = Informer(api, "/api/v1/persistentvolumes", self._on_volume)
        self.services = Informer(api, "/api/v1/services", self._on_service)
        self.slices = Informer(api, "/apis/discovery.k8s.io/v1/endpointslices", self._on_slice)
        self.proxies = Proxies(bridge, self.slices)
        self.dns = Dns(self.etc, self.services, self.slices, self.pods)
        self._tasks: list[asyncio.Task[Any]] = []

    # Start and stop

    async def start(self) -> None:
        await self._ensure_storage_class()
        await self._register_nodes()
        for informer in (self.namespaces, self.services, self.slices, self.claims, self.volumes):
            self._tasks.append(
                asyncio.create_task(informer.run(), name=f"informer {informer.path}")
            )
        await asyncio.gather(
            *(i.synced.wait() for i in (self.namespaces, self.services, self.slices))
        )
        self._tasks.append(asyncio.create_task(self.pod_informer.run(), name="informer pods"))
        self._tasks.append(asyncio.create_task(self._heartbeats(), name="node heartbeats"))
        self._tasks.append(asyncio.create_task(self.dns.run(), name="dns"))
        if self.config.apiserver_port:
            await self.proxies.host_port(
                self.config.node_ips[0], self.config.apiserver_port, "127.0.0.1"
            )
        await self.pod_informer.synced.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [p.task for p in self.pods.values() if p.task is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        reporters = [p.status_task for p in self.pods.values() if p.status_task is not None]
        for task in reporters:
            task.cancel()
        await asyncio.gather(*reporters, return_exceptions=True)
        await self.proxies.close()

    # Nodes

    async def _register_nodes(self) -> None:
        for name, ip in zip(self.config.nodes, self.config.node_ips, strict=True):
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "node.kubernetes.io/instance-type": "nest-harness",
                    },
                },
            }
            with contextlib.suppress(ApiError):
                await self.api.create("/api/v1/nodes", node)
            await self.api.merge_patch(
                f"/api/v1/nodes/{name}/status", {"status": self._node_status(ip)}
            )
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {
                    "holderIdentity": name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": micro_now(),
                },
            }
            for _ in range(100):  # kube-node-lease is created by the API server shortly after start
                try:
                    await self.api.create(
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease
                    )
                    break
                except ApiError as exc:
                    if exc.status == 409:
                        break
                    await asyncio.sleep(0.1)

    def _node_status(self, ip: str) -> Obj:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def condition(kind: str, status: str, reason: str) -> Obj:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }

        resources = {"cpu": "32", "memory": "128Gi", "pods": "1000", "ephemeral-storage": "500Gi"}
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                condition("Ready", "True", "KubeletReady"),
            ],
            "addresses": [{"type": "InternalIP", "address": ip}],
            "nodeInfo": {
                "kubeletVersion": self.config.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "nest-harness://1",
                "osImage": "nest test harness",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        }

    async def _heartbeats(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(10)
            beats += 1
            for name, ip in zip(self.config.nodes, self.config.node_ips, strict=True):
                try:
                    await self.api.merge_patch(
                        f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                        {"spec": {"renewTime": micro_now(), "holderIdentity": name}},
                    )
                    if beats % 6 == 0:
                        await self.api.merge_patch(
                            f"/api/v1/nodes/{name}/status", {"status": self._node_status(ip)}
                        )
                except Exception as exc:
                    log.warning("heartbeat of %s: %s", name, exc)

    # Pods

    def mode(self, namespace: str) -> str:
        ns = self.namespaces.get("", namespace)
        if ns is None:
            return self.config.default_mode
        meta = ns["metadata"]
        if (meta.get("annotations") or {}).get(HOLD_ANNOTATION) == "true":
            return pods.HOLD
        mode = (meta.get("labels") or {}).get(MODE_LABEL, self.config.default_mode)
        return mode if mode in (pods.FAKE, pods.REAL, pods.HOLD) else self.config.default_mode

    async def _on_namespace(self, kind: str, ns: Obj) -> None:
        name = ns["metadata"]["name"]
        for pod in list(self.pods.values()):
            if pod.namespace == name:
                pod.update(pod.obj, self.mode(name))

    async def _on_pod(self, kind: str, obj: Obj) -> None:
        uid = obj["metadata"]["uid"]
        node = obj["spec"].get("nodeName")
        if node not in self.config.nodes:
            return
        known = self.pods.get(uid)
        if kind == "DELETED":
            if known is not None and known.task is not None:
                known.task.cancel()
                self.pods.pop(uid, None)
            return
        if known is not None:
            known.update(obj, self.mode(known.namespace))
            return
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") and not obj["metadata"].get("deletionTimestamp"):
            return  # finished before this agent started (or by an earlier agent)
        pod = pods.Pod(self.runtime, obj, self.mode(obj["metadata"]["namespace"]), self._gone)
        self.pods[uid] = pod
        if obj["metadata"].get("deletionTimestamp"):
            pod.deleting = True
        pod.dns = self.dns
        pod.start()

    def _gone(self, pod: pods.Pod) -> None:
        self.pods.pop(pod.uid, None)
        self.dns.changed()

    # Volumes

    async def _ensure_storage_class(self) -> None:
        storage_class = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        await self.api.apply(
            f"/apis/storage.k8s.io/v1/storageclasses/{STORAGE_CLASS}", storage_class
        )

    async def _on_claim(self, kind: str, claim: Obj) -> None:
        if kind == "DELETED":
            return
        meta, spec = claim["metadata"], claim["spec"]
        provisioner = (meta.get("annotations") or {}).get(
            "volume.kubernetes.io/storage-provisioner"
        )
        if spec.get("volumeName") or (claim.get("status") or {}).get("phase") != "Pending":
            return
        if provisioner != PROVISIONER and spec.get("storageClassName") != STORAGE_CLASS:
            return
        if meta.get("deletionTimestamp"):
            return
        name = f"pvc-{meta['uid']}"
        path = self.config.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": spec.get("storageClassName", STORAGE_CLASS),
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            await self.api.create("/api/v1/persistentvolumes", volume)
        except ApiError as exc:
            if exc.status != 409:
                raise

    async def _on_volume(self, kind: str, volume: Obj) -> None:
        if kind == "DELETED":
            return
        annotations = volume["metadata"].get("annotations") or {}
        if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
            return
        if (volume.get("status") or {}).get("phase") not in ("Released", "Failed"):
            return
        if volume["spec"].get("persistentVolumeReclaimPolicy") != "Delete":
            return
        path = Path(volume["spec"]["hostPath"]["path"])
        if path.is_relative_to(self.config.root):
            await asyncio.to_thread(shutil.rmtree, path, True)
        await self.api.delete(f"/api/v1/persistentvolumes/{volume['metadata']['name']}")

    # Services

    async def _on_service(self, kind: str, service: Obj) -> None:
        self.dns.changed()
        if kind == "DELETED":
            await self.proxies.remove(service)
            return
        await self.proxies.sync(service, self.config.node_ips)
        spec = service["spec"]
        if spec.get("type") == "LoadBalancer":
            ip = self.proxies.lb_ip(service)
            ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress")
            if ip and ingress != [{"ip": ip, "ipMode": "VIP"}]:
                meta = service["metadata"]
                await self.api.merge_patch(
                    f"/api/v1/namespaces/{meta['namespace']}/services/{meta['name']}/status",
                    {"status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}},
                )

    async def _on_slice(self, kind: str, obj: Obj) -> None:
        self.dns.changed()


@dataclass
class _Listener:
    server: asyncio.Server
    ip: str
    owner: str = ""
    """`<namespace>/<name>` of the Service it forwards for."""


@dataclass
class Proxies:
    """TCP forwarding for Services, on addresses of the harness bridge."""

    bridge: Bridge
    slices: Informer
    listeners: dict[tuple[str, int], _Listener] = field(default_factory=dict)
    by_service: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    lb_ips: dict[str, str] = field(default_factory=dict)
    _round_robin: int = 0
    _latest: dict[str, Obj] = field(default_factory=dict)
    _retries: set[asyncio.Task[None]] = field(default_factory=set)

    @staticmethod
    def _key(service: Obj) -> str:
        return f"{service['metadata']['namespace']}/{service['metadata']['name']}"

    def lb_ip(self, service: Obj) -> str | None:
        return self.lb_ips.get(self._key(service))

    async def host_port(self, ip: str, port: int, target: str) -> None:
        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _pipe(reader, writer, target, port)

        server = await asyncio.start_server(forward, ip, port)
        self.listeners[(ip, port)] = _Listener(server, ip)

    async def sync(self, service: Obj, node_ips: list[str]) -> None:
        key = self._key(service)
        self._latest[key] = service
        spec = service["spec"]
        wanted: dict[tuple[str, int], Obj] = {}
        cluster_ip = spec.get("clusterIP")
        kind = spec.get("type", "ClusterIP")
        if kind == "LoadBalancer" and key not in self.lb_ips:
            ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            taken = set(self.lb_ips.values())
            known = [i["ip"] for i in ingress if i.get("ip") and i["ip"] not in taken]
            self.lb_ips[key] = known[0] if known else self.bridge.allocate_lb_ip(taken)
        for port in spec.get("ports", []):
            if port.get("protocol", "TCP") != "TCP":
                continue
            if cluster_ip and cluster_ip != "None":
                wanted[(cluster_ip, int(port["port"]))] = port
            if kind in ("NodePort", "LoadBalancer") and port.get("nodePort"):
                for ip in node_ips:
                    wanted[(ip, int(port["nodePort"]))] = port
            if kind == "LoadBalancer":
                wanted[(self.lb_ips[key], int(port["port"]))] = port
        current = self.by_service.get(key, set())
        for address in current - set(wanted):
            await self._close(address)
        for address, port in wanted.items():
            existing = self.listeners.get(address)
            if existing is not None and existing.owner == key:
                continue
            if existing is not None:
                # A port another Service held (a NodePort freed by a deletion this agent has
                # not seen yet, or reused at once): it forwards for this Service from now on.
                await self._close(address)
                self.by_service.get(existing.owner, set()).discard(address)
            ip, number = address
            if ip not in node_ips:
                self.bridge.add_address(ip)
            namespace, name = key.split("/", 1)
            handler = self._handler(namespace, name, port)
            try:
                server = await asyncio.start_server(handler, ip, number)
            except OSError as exc:
                # Held by something outside the harness (e.g. a test's own listener): try
                # again shortly, as kube-proxy keeps reconciling its rules.
                log.warning("service %s: cannot listen on %s:%s: %s", key, ip, number, exc)
                self._retry(service, node_ips)
                continue
            self.listeners[address] = _Listener(server, ip, key)
        self.by_service[key] = set(wanted) & set(self.listeners)
        if kind != "LoadBalancer" and key in self.lb_ips:
            self.bridge.remove_address(self.lb_ips.pop(key))

    def _retry(self, service: Obj, node_ips: list[str]) -> None:
        key = self._key(service)
        self._latest[key] = service

        async def again() -> None:
            await asyncio.sleep(1.0)
            latest = self._latest.get(key)
            if latest is not None:
                await self.sync(latest, node_ips)

        task = asyncio.get_running_loop().create_task(again())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def remove(self, service: Obj) -> None:
        key = self._key(service)
        self._latest.pop(key, None)
        for address in self.by_service.pop(key, set()):
            listener = self.listeners.get(address)
            if listener is not None and listener.owner == key:
                await self._close(address)
        if key in self.lb_ips:
            self.bridge.remove_address(self.lb_ips.pop(key))
        cluster_ip = service["spec"].get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            self.bridge.remove_address(cluster_ip)

    async def _close(self, address: tuple[str, int]) -> None:
        listener = self.listeners.pop(address, None)
        if listener is not None:
            listener.server.close()

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
        for address in list(self.listeners):
            await self._close(address)

    def backends(self, namespace: str, name: str, port: Obj) -> list[tuple[str, int]]:
        found = []
        for endpoint_slice in self.slices.items():
            meta = endpoint_slice["metadata"]
            if meta.get("namespace") != namespace:
                continue
            if (meta.get("labels") or {}).get("kubernetes.io/service-name") != name:
                continue
            numbers = [
                p["port"]
                for p in endpoint_slice.get("ports") or []
                if p.get("name", "") == port.get("name", "") and p.get("port")
            ]
            if not numbers:
                continue
            for endpoint in endpoint_slice.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                found += [(address, int(numbers[0])) for address in endpoint["addresses"]]
        return found

    def _handler(
        self, namespace: str, name: str, port: Obj
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backends = self.backends(namespace, name, port)
            if not backends:
                writer.close()
                return
            self._round_robin += 1
            host, number = backends[self._round_robin % len(backends)]
            await _pipe(reader, writer, host, number)

        return handle


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), 5.0
        )
    except (OSError, TimeoutError):
        writer.close()
        return

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()

    await asyncio.gather(copy(reader, upstream_writer), copy(upstream_reader, writer))


class Dns:
    """Hosts files from Services and EndpointSlices, rewritten (atomically) after changes."""

    def __init__(
        self, etc: Path, services: Informer, slices: Informer, pods_by_uid: dict[str, pods.Pod]
    ) -> None:
        self.etc = etc
        self.services = services
        self.slices = slices
        self.pods = pods_by_uid
        self._changed = asyncio.Event()
        self.entries: list[tuple[str, list[str]]] = []

    def changed(self) -> None:
        self._changed.set()

    def names(self) -> list[tuple[str, list[str]]]:
        entries: dict[str, list[str]] = {}

        def add(ip: str, *names: str) -> None:
            bucket = entries.setdefault(ip, [])
            bucket += [n for n in names if n not in bucket]

        def both(base: str) -> tuple[str, str]:
            return base, f"{base}.{DNS_DOMAIN}"

        headless = set()
        for service in self.services.items():
            meta, spec = service["metadata"], service["spec"]
            base = f"{meta['name']}.{meta['namespace']}.svc"
            ip = spec.get("clusterIP")
            if ip and ip != "None":
                add(ip, *both(base))
            else:
                headless.add((meta["namespace"], meta["name"]))
        for endpoint_slice in self.slices.items():
            meta = endpoint_slice["metadata"]
            service_name = (meta.get("labels") or {}).get("kubernetes.io/service-name")
            if (meta["namespace"], service_name) not in headless:
                continue
            base = f"{service_name}.{meta['namespace']}.svc"
            for endpoint in endpoint_slice.get("endpoints") or []:
                for address in endpoint.get("addresses") or []:
                    add(address, *both(base))
                    if endpoint.get("hostname"):
                        add(address, *both(f"{endpoint['hostname']}.{base}"))
        return sorted(entries.items())

    def render(self, own: list[str] | None = None) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        if own:
            lines.append(" ".join(own))
        lines += [f"{ip} {' '.join(names)}" for ip, names in self.entries]
        return "\n".join(lines) + "\n"

    @staticmethod
    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        temporary.replace(path)

    def write_pod(self, pod: pods.Pod) -> None:
        own = None
        if pod.ip is not None:
            spec = pod.obj["spec"]
            hostname = spec.get("hostname") or pod.name
            own = [pod.ip]
            if spec.get("subdomain"):
                fqdn = f"{hostname}.{spec['subdomain']}.{pod.namespace}.svc"
                own += [f"{fqdn}.{DNS_DOMAIN}", fqdn]
            own.append(hostname)
        aliases = [
            f"{alias['ip']} {' '.join(alias.get('hostnames') or [])}"
            for alias in pod.obj["spec"].get("hostAliases") or []
        ]
        text = self.render(own)
        if aliases:  # as the kubelet writes them: after the pod's own and the cluster's names
            text += "# Entries added by HostAliases.\n" + "\n".join(aliases) + "\n"
        self.write(pod.directory / "etc" / "hosts", text)

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            await asyncio.sleep(0.02)
            self._changed.clear()
            self.entries = self.names()
            # In place, not renamed: processes on the host see this file bind-mounted over their
            # /etc/hosts (`harness exec`), and a bind mount follows the inode.
            (self.etc / "hosts").write_text(self.render())
            for pod in list(self.pods.values()):
                if pod.netns is not None or pod.mode == pods.REAL:
                    self.write_pod(pod)
