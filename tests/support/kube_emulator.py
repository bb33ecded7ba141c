"""A Kubernetes API emulator for tests: kmock's emulator with the apiserver semantics Nest needs.

kmock 0.8 answers `/api/v1/namespaces` paths with 500, has no resourceVersion, generation or
409 Conflict, ignores `labelSelector`, answers server-side apply on a missing object with 404,
has no PUT, treats `/status` as a patch of the whole object, and scans every stored object on
each request. `KubeEmulator` keeps kmock's server, discovery endpoints and request handling
around them, and serves resource paths itself with what the provisioner relies on:

- server-side apply (`application/apply-patch+yaml`) creates a missing object, else merges
  (maps merged, lists replaced, `status` left alone), and keeps each field manager's last
  applied configuration: a field a manager stops applying is removed unless another manager
  applies it (lists are atomic: owned whole);
- namespaces: objects may only be created in an existing, non-terminating namespace; a new
  namespace gets the `kubernetes` finalizer in `spec.finalizers` (changed only through its
  `finalize` subresource); deleting a namespace makes it `Terminating` (a `deletionTimestamp`),
  then the namespace controller removes everything in it (`namespace_finalize_delay`, the time
  pods take to terminate) and its `kubernetes` finalizer; while any `spec.finalizers` remain, a
  further DELETE answers 409 Conflict, as the API server does; the namespace goes once both
  `spec.finalizers` and `metadata.finalizers` are empty;
- `metadata.finalizers` on any object: a DELETE only sets its `deletionTimestamp`; the object
  goes when a write empties its finalizers;
- `metadata.uid`, `resourceVersion`, `creationTimestamp`, and `generation` bumped on every
  `spec` change; 409 on POST of an existing object; `labelSelector` (`k=v,...`); PUT;
  `/status` touches only `status`; NodePort allocation with 422 on a taken port; a ClusterIP
  for every Service that is not headless (`spec.clusterIP`/`clusterIPs`, kept on updates, a
  fresh one after a re-creation, as the API server's random allocation gives);
- faults: `fail(...)` makes matching requests answer an error status or stall, N times;
- watches (`?watch=true`, one namespace or all, with `labelSelector` and `resourceVersion`):
  every change made through the API, by `touch` or `remove`, and each object a namespace
  deletion removes, is streamed as a watch event; a `resourceVersion` older than the bounded
  event history answers an `ERROR` event with code 410 (Expired), as the API server does.

`ReadinessController` plays kwok: it marks Deployments and StatefulSets rolled out and gives
LoadBalancer Services an ingress hostname, unless paused. `TenantApis` serves every tenant's API
over TLS with the certificates the provisioner issued (chosen by SNI), verifying client
certificates against the cluster's CA.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ipaddress
import itertools
import json
import re
import ssl
import tempfile
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

Obj = dict[str, Any]

TENANT_DOMAIN = "tenants.nest.test"


def tenant_hostname(namespace: str) -> str:
    """The load-balancer hostname the controller gives a cluster's endpoint Service."""
    return f"{namespace}.{TENANT_DOMAIN}"


@dataclass
class Route:
    """A parsed resource path."""

    resource: str  # "v1/secrets", "apps/v1/deployments"
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def cluster_scoped(self) -> bool:
        return self.resource in CLUSTER_SCOPED


NAMESPACE_FINALIZER = "kubernetes"
"""The finalizer the API server puts in every namespace's `spec.finalizers`."""

CLUSTER_SCOPED = {
    "v1/namespaces",
    "v1/nodes",
    "rbac.authorization.k8s.io/v1/clusterroles",
    "rbac.authorization.k8s.io/v1/clusterrolebindings",
}


def parse_route(path: str) -> Route | None:
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group_version, rest = parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, plural, tail = rest[1], rest[2], rest[3:]
    else:
        namespace, plural, tail = None, rest[0], rest[1:]
    name = tail[0] if tail else None
    subresource = "/".join(tail[1:]) or None
    return Route(f"{group_version}/{plural}", namespace, name, subresource)


def merge(target: Any, patch: Any, *, nulls_delete: bool) -> Any:
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    result = dict(target)
    for key, value in patch.items():
        if value is None and nulls_delete:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value, nulls_delete=nulls_delete)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths to the values of nested maps; a list is one value (atomic, as Nest applies them)."""
    if not isinstance(obj, dict) or (prefix and not obj):
        return [prefix] if prefix else []
    paths: list[tuple[str, ...]] = []
    for key, value in obj.items():
        paths.extend(_leaf_paths(value, (*prefix, key)))
    return paths


def _remove_path(obj: Obj, path: tuple[str, ...]) -> None:
    """Remove the value at `path` and the maps it leaves empty."""
    parents: list[Obj] = []
    node: Any = obj
    for key in path[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            return
        parents.append(node)
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, key in zip(reversed(parents), reversed(path[:-1]), strict=True):
        if parent[key] == {}:
            del parent[key]
        else:
            break


@dataclass
class Fault:
    """Requests matching `method` and `path` (a regex searched in the path) fail `times` times."""

    method: str | None
    path: re.Pattern[str]
    status: int | None = 500
    delay: float = 0.0
    times: int | None = 1
    hits: int = 0


class Problem(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


Hook = Callable[[str, Obj], None]


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the semantics listed in the module docstring."""

    namespace_finalize_delay: float = 0.02
    store: dict[str, dict[str | None, dict[str, Obj]]] = attrs.field(
        factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    faults: list[Fault] = attrs.field(factory=list)
    hooks: list[Hook] = attrs.field(factory=list)
    counts: dict[str, int] = attrs.field(factory=lambda: defaultdict(int))
    requires_namespaces: bool = True
    _versions: Any = attrs.field(factory=lambda: itertools.count(1))
    _node_ports: dict[int, tuple[str | None, str]] = attrs.field(factory=dict)
    service_cidr: str = "10.96.0.0/12"
    """The management cluster's Service range, where ClusterIPs come from."""
    _cluster_ips: dict[str, tuple[str | None, str]] = attrs.field(factory=dict)
    _next_cluster_ip: int = 10
    _pending: set[asyncio.Task[None]] = attrs.field(factory=set)
    watch_history: int = 2_000
    _forgotten: int = 0
    _applied: defaultdict[tuple[str, str | None, str], dict[str, Obj]] = attrs.field(
        factory=lambda: defaultdict(dict)
    )
    """(resource, namespace, name) -> field manager -> the configuration it last applied."""
    _history: deque[tuple[int, str, str, Obj]] = attrs.field(factory=deque)
    _watchers: list[_Watch] = attrs.field(factory=list)

    # Test helpers

    def fail(
        self,
        method: str | None,
        path: str,
        *,
        status: int | None = 500,
        delay: float = 0.0,
        times: int | None = 1,
    ) -> Fault:
        fault = Fault(method.upper() if method else None, re.compile(path), status, delay, times)
        self.faults.append(fault)
        return fault

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        return self.store[resource][namespace].get(name)

    def items(self, resource: str, namespace: str | None = None) -> list[Obj]:
        if namespace is not None:
            return list(self.store[resource][namespace].values())
        return [obj for bucket in self.store[resource].values() for obj in bucket.values()]

    def remove(self, resource: str, namespace: str | None, name: str) -> None:
        """Delete behind the client's back (no cascade)."""
        obj = self.store[resource][namespace].pop(name, None)
        if obj is not None:
            self._release(resource, namespace, name)
            self._emit(resource, "DELETED", obj, deleted=True)

    def _release(self, resource: str, namespace: str | None, name: str) -> None:
        """Free what a deleted object held: its applied configurations, a Service's ports."""
        self._applied.pop((resource, namespace, name), None)
        if resource == "v1/services":
            owner = (namespace, name)
            for port, used in list(self._node_ports.items()):
                if used == owner:
                    del self._node_ports[port]
            for ip, used in list(self._cluster_ips.items()):
                if used == owner:
                    del self._cluster_ips[ip]

    def touch(self, resource: str, obj: Obj) -> None:
        """Record a change made by a test controller directly on a stored object."""
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        self._emit(resource, "MODIFIED", obj)

    # Watches

    def _emit(self, resource: str, kind: str, obj: Obj, *, deleted: bool = False) -> None:
        # References, not copies: a watcher is sent the object as it is when the event is sent
        # (enough for "something changed"; the history stays cheap for the benchmarks).
        if deleted:
            obj = {**obj, "metadata": {**obj["metadata"]}}
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
        version = int(obj["metadata"]["resourceVersion"])
        self._history.append((version, resource, kind, obj))
        while len(self._history) > self.watch_history:
            self._forgotten = self._history.popleft()[0]
        for watch in self._watchers:
            if watch.matches(resource, obj):
                watch.queue.put_nowait((kind, obj))

    async def _watch(
        self, raw: aiohttp.web.BaseRequest, route: Route
    ) -> aiohttp.web.StreamResponse:
        namespace = None if route.cluster_scoped else route.namespace
        watch = _Watch(route.resource, namespace, _selector(raw.query.get("labelSelector", "")))
        since = raw.query.get("resourceVersion", "")
        backlog: list[tuple[str, Obj]] = []
        if since in ("", "0"):
            candidates = (
                self.items(route.resource)
                if namespace is None
                else self.items(route.resource, namespace)
            )
            backlog = [("ADDED", obj) for obj in candidates if watch.matches(route.resource, obj)]
        else:
            if int(since) < self._forgotten:
                backlog = [("ERROR", _expired(since))]
            else:
                backlog = [
                    (kind, obj)
                    for version, resource, kind, obj in self._history
                    if version > int(since) and watch.matches(resource, obj)
                ]
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        timeout = float(raw.query.get("timeoutSeconds", "1800"))
        self._watchers.append(watch)
        try:
            for kind, obj in backlog:
                await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            if backlog and backlog[0][0] == "ERROR":
                return response
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    kind, obj = await asyncio.wait_for(watch.queue.get(), left)
                except TimeoutError:
                    break
                await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            self._watchers.remove(watch)
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await response.write_eof()
        return response

    # Serving

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        await raw.read()
        route = parse_route(raw.path)
        for fault in self.faults:
            if fault.times is not None and fault.hits >= fault.times:
                continue
            if (fault.method is None or fault.method == raw.method) and fault.path.search(raw.path):
                fault.hits += 1
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    return _status(fault.status, "InjectedFault", f"injected {fault.status}")
                break
        if route is None:
            return await super().__call__(raw)
        self.counts[f"{raw.method} {route.resource}"] += 1
        if raw.method == "GET" and raw.query.get("watch") in ("true", "1", "True"):
            if route.name is not None:
                return _status(405, "MethodNotAllowed", "watch a collection, not one object")
            return await self._watch(raw, route)
        try:
            return aiohttp.web.json_response(await self._serve(raw, route))
        except Problem as problem:
            return _status(problem.status, problem.reason, problem.message)

    async def _serve(self, raw: aiohttp.web.BaseRequest, route: Route) -> Obj:
        method = raw.method
        if route.name is None:
            if method == "GET":
                return self._list(route, raw.query.get("labelSelector", ""))
            if method == "POST":
                return self._create(route, await _body(raw))
            raise Problem(405, "MethodNotAllowed", f"{method} on a collection")
        if method == "GET":
            return self._fetch(route)
        if method == "DELETE":
            return self._delete(route)
        if method == "PUT":
            return self._write(route, await _body(raw), mode="replace")
        if method == "PATCH":
            content_type = raw.headers.get("Content-Type", "")
            mode = "apply" if "apply-patch" in content_type else "merge"
            manager = raw.query.get("fieldManager", "")
            return self._write(route, await _body(raw), mode=mode, manager=manager)
        raise Problem(405, "MethodNotAllowed", method)

    def _bucket(self, route: Route) -> dict[str, Obj]:
        return self.store[route.resource][None if route.cluster_scoped else route.namespace]

    def _list(self, route: Route, selector: str) -> Obj:
        matches = _selector(selector)
        if route.namespace is None and not route.cluster_scoped:
            candidates = self.items(route.resource)
        else:
            candidates = list(self._bucket(route).values())
        items = [obj for obj in candidates if matches(obj["metadata"].get("labels") or {})]
        return {
            "kind": "List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(next(self._versions))},
            "items": items,
        }

    def _fetch(self, route: Route) -> Obj:
        obj = self._bucket(route).get(str(route.name))
        if obj is None:
            raise _not_found(route)
        return obj

    def _check_namespace(self, route: Route) -> None:
        if route.cluster_scoped or not self.requires_namespaces:
            return
        namespace = self.store["v1/namespaces"][None].get(str(route.namespace))
        if namespace is None:
            raise Problem(404, "NotFound", f'namespaces "{route.namespace}" not found')
        if namespace.get("status", {}).get("phase") == "Terminating":
            raise Problem(
                403,
                "Forbidden",
                f"unable to create new content in namespace {route.namespace} because it is "
                "being terminated",
            )

    def _create(self, route: Route, body: Obj) -> Obj:
        name = body.get("metadata", {}).get("name")
        if not name:
            raise Problem(422, "Invalid", "metadata.name: Required value")
        route = Route(route.resource, route.namespace, name, None)
        if name in self._bucket(route):
            raise Problem(409, "AlreadyExists", f'{route.resource} "{name}" already exists')
        self._check_namespace(route)
        return self._store(route, None, body)

    def _write(self, route: Route, body: Obj, *, mode: str, manager: str = "") -> Obj:
        bucket = self._bucket(route)
        current = bucket.get(str(route.name))
        if route.subresource == "status":
            if current is None:
                raise _not_found(route)
            updated = copy.deepcopy(current)
            updated["status"] = merge(
                current.get("status", {}), body.get("status", {}), nulls_delete=True
            )
            return self._store(route, current, updated, spec_change=False)
        if route.subresource == "finalize" and route.resource == "v1/namespaces":
            if current is None:
                raise _not_found(route)
            updated = copy.deepcopy(current)
            updated.setdefault("spec", {})["finalizers"] = list(
                (body.get("spec") or {}).get("finalizers") or []
            )
            stored = self._store(route, current, updated, spec_change=False)
            self._settle(route, stored)
            return stored
        owners = self._applied[(route.resource, route.namespace, str(route.name))]
        if current is None:
            if mode != "apply":
                raise _not_found(route)
            self._check_namespace(route)
            owners.clear()
            owners[manager] = copy.deepcopy(body)
            return self._store(route, None, body)
        if mode == "replace":
            updated = copy.deepcopy(body)
            updated["status"] = current.get("status", {})
        else:
            patch = {key: value for key, value in body.items() if key != "status"}
            base = current
            if mode == "apply":
                # Field ownership as server-side apply keeps it: a field this manager applied
                # before and no longer applies is removed, unless another manager applies it.
                previous = owners.get(manager)
                if previous is not None:
                    kept = set(_leaf_paths(patch))
                    for other, applied in owners.items():
                        if other != manager:
                            kept |= set(_leaf_paths(applied))
                    base = copy.deepcopy(current)
                    for path in _leaf_paths(previous):
                        if path not in kept and path[0] not in ("status", "apiVersion", "kind"):
                            _remove_path(base, path)
                owners[manager] = copy.deepcopy(patch)
            updated = merge(base, patch, nulls_delete=mode == "merge")
        stored = self._store(route, current, updated)
        self._settle(route, stored)
        return stored

    def _store(
        self, route: Route, current: Obj | None, obj: Obj, *, spec_change: bool = True
    ) -> Obj:
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        metadata["name"] = route.name or metadata.get("name")
        if not route.cluster_scoped:
            metadata["namespace"] = route.namespace
        if current is None:
            metadata["uid"] = str(uuid.uuid4())
            metadata["creationTimestamp"] = _now()
            metadata["generation"] = 1
        else:
            for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                if key in current["metadata"]:
                    metadata[key] = current["metadata"][key]
            if spec_change and obj.get("spec") != current.get("spec"):
                metadata["generation"] = int(current["metadata"].get("generation", 1)) + 1
            if current.get("status") is not None and route.subresource != "status":
                obj["status"] = current["status"]
        if route.resource == "v1/services":
            self._allocate_cluster_ip(route, obj, current)
            self._allocate_node_ports(route, obj, current)
        if route.resource == "v1/namespaces":
            spec = obj.setdefault("spec", {})
            if current is None:
                # The API server's namespace strategy: every new namespace is Active and carries
                # the `kubernetes` finalizer, which only the namespace controller removes.
                finalizers = list(spec.get("finalizers") or [])
                if NAMESPACE_FINALIZER not in finalizers:
                    finalizers.append(NAMESPACE_FINALIZER)
                spec["finalizers"] = finalizers
                obj["status"] = {"phase": "Active"}
            else:
                if route.subresource != "finalize":
                    spec["finalizers"] = list((current.get("spec") or {}).get("finalizers") or [])
                obj["status"] = current.get("status") or {"phase": "Active"}
        metadata["resourceVersion"] = str(next(self._versions))
        self._bucket(route)[str(metadata["name"])] = obj
        for hook in self.hooks:
            hook(route.resource, obj)
        self._emit(route.resource, "ADDED" if current is None else "MODIFIED", obj)
        return obj

    def _allocate_cluster_ip(self, route: Route, obj: Obj, current: Obj | None) -> None:
        spec = obj.setdefault("spec", {})
        if spec.get("type") == "ExternalName":
            return
        if current is not None:
            # Immutable once allocated; an update that leaves it out keeps it.
            kept = current.get("spec") or {}
            for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                if key in kept:
                    spec[key] = copy.deepcopy(kept[key])
            return
        wanted = spec.get("clusterIP")
        if wanted == "None":
            spec["clusterIPs"] = ["None"]
        else:
            network = ipaddress.ip_network(self.service_cidr)
            if wanted:
                if wanted in self._cluster_ips or ipaddress.ip_address(wanted) not in network:
                    raise Problem(
                        422,
                        "Invalid",
                        f'spec.clusterIPs: Invalid value: ["{wanted}"]: failed to allocate '
                        "IP: provided IP is already allocated or out of range",
                    )
            else:
                # The API server picks at random; the next free address after the last one
                # handed out gives the same property: a re-created Service gets another IP.
                size = network.num_addresses - 2
                for _ in range(size):
                    candidate = str(network.network_address + 1 + self._next_cluster_ip % size)
                    self._next_cluster_ip += 1
                    if candidate not in self._cluster_ips:
                        wanted = candidate
                        break
                else:
                    raise Problem(500, "InternalError", "the Service IP range is full")
            spec["clusterIP"] = wanted
            spec["clusterIPs"] = [wanted]
            self._cluster_ips[str(wanted)] = (route.namespace, str(route.name))
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")

    def _allocate_node_ports(self, route: Route, obj: Obj, current: Obj | None) -> None:
        spec = obj.get("spec", {})
        # Like the API server: a port that was allocated stays, unless another is asked for.
        held = {
            port.get("name"): port["nodePort"]
            for port in (current or {}).get("spec", {}).get("ports", [])
            if port.get("nodePort")
        }
        for port in spec.get("ports", []):
            if port.get("nodePort") is None and port.get("name") in held:
                port["nodePort"] = held[port.get("name")]
        owner = (route.namespace, str(route.name or obj["metadata"]["name"]))
        for port, used in list(self._node_ports.items()):
            if used == owner:
                del self._node_ports[port]
        if spec.get("type") not in ("NodePort", "LoadBalancer"):
            for port in spec.get("ports", []):
                port.pop("nodePort", None)
            return
        for port in spec.get("ports", []):
            wanted = port.get("nodePort")
            if wanted is not None and self._node_ports.get(wanted, owner) != owner:
                raise Problem(
                    422,
                    "Invalid",
                    f"spec.ports.nodePort: Invalid value: {wanted}: provided port is already "
                    "allocated",
                )
            if wanted is None:
                wanted = next(p for p in range(30000, 32768) if p not in self._node_ports)
                port["nodePort"] = wanted
            self._node_ports[int(wanted)] = owner

    def _delete(self, route: Route) -> Obj:
        bucket = self._bucket(route)
        obj = bucket.get(str(route.name))
        if obj is None:
            raise _not_found(route)
        if route.resource == "v1/namespaces":
            if not obj["metadata"].get("deletionTimestamp"):
                obj["status"]["phase"] = "Terminating"
                obj["metadata"]["deletionTimestamp"] = _now()
                self.touch(route.resource, obj)
                task = asyncio.get_running_loop().create_task(
                    self._finalize_namespace(str(route.name))
                )
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            elif (obj.get("spec") or {}).get("finalizers"):
                # The API server's namespace storage: a namespace being emptied refuses a
                # second deletion until its spec finalizers are gone.
                raise Problem(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on namespaces "{route.name}": The system is '
                    "ensuring all content is removed from this namespace.  Upon completion, "
                    "this namespace will automatically be purged by the system.",
                )
            return obj
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                self.touch(route.resource, obj)
            return obj
        return self._purge(route, obj)

    def _settle(self, route: Route, obj: Obj) -> None:
        """Remove an object being deleted once nothing holds it any more."""
        metadata = obj["metadata"]
        if not metadata.get("deletionTimestamp") or metadata.get("finalizers"):
            return
        if route.resource == "v1/namespaces" and (obj.get("spec") or {}).get("finalizers"):
            return
        if self._bucket(route).get(str(metadata["name"])) is obj:
            self._purge(Route(route.resource, route.namespace, metadata["name"], None), obj)

    def _purge(self, route: Route, obj: Obj) -> Obj:
        bucket = self._bucket(route)
        del bucket[str(route.name)]
        self._release(route.resource, route.namespace, str(route.name))
        self._emit(route.resource, "DELETED", obj, deleted=True)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Success",
            "details": {"name": route.name},
        }

    async def _finalize_namespace(self, name: str) -> None:
        """The namespace controller: remove the content, then the `kubernetes` finalizer."""
        await asyncio.sleep(self.namespace_finalize_delay)
        for resource, buckets in self.store.items():
            if resource != "v1/namespaces":
                for obj in (buckets.pop(name, None) or {}).values():
                    self._release(resource, name, obj["metadata"]["name"])
                    self._emit(resource, "DELETED", obj, deleted=True)
        current = self.store["v1/namespaces"][None].get(name)
        if current is None:
            return
        updated = copy.deepcopy(current)
        spec = updated.setdefault("spec", {})
        spec["finalizers"] = [f for f in spec.get("finalizers") or [] if f != NAMESPACE_FINALIZER]
        route = Route("v1/namespaces", None, name, "finalize")
        self._settle(route, self._store(route, current, updated, spec_change=False))


LabelMatcher = Callable[[dict[str, str]], bool]


def _selector(text: str) -> LabelMatcher:
    """A label selector's equality and existence terms: `k=v`, `k==v`, `k!=v`, `k`, `!k`."""
    terms: list[LabelMatcher] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            terms.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            terms.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif part.startswith("!"):
            terms.append(lambda labels, k=part[1:]: k not in labels)
        else:
            terms.append(lambda labels, k=part: k in labels)
    return lambda labels: all(term(labels) for term in terms)


@dataclass
class _Watch:
    resource: str
    namespace: str | None
    selector: LabelMatcher
    queue: asyncio.Queue[tuple[str, Obj]] = field(default_factory=asyncio.Queue)

    def matches(self, resource: str, obj: Obj) -> bool:
        metadata = obj.get("metadata", {})
        return (
            resource == self.resource
            and (self.namespace is None or metadata.get("namespace") == self.namespace)
            and self.selector(metadata.get("labels") or {})
        )


def _expired(since: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": 410,
        "reason": "Expired",
        "message": f"too old resource version: {since}",
    }


async def _body(raw: aiohttp.web.BaseRequest) -> Obj:
    text = await raw.text()
    if not text:
        return {}
    try:
        loaded = json.loads(text)
    except ValueError:
        loaded = yaml.safe_load(text)  # apply patches may be YAML
    if not isinstance(loaded, dict):
        raise Problem(400, "BadRequest", "the body is not an object")
    return loaded


def _not_found(route: Route) -> Problem:
    plural = route.resource.rsplit("/", 1)[-1]
    return Problem(404, "NotFound", f'{plural} "{route.name}" not found')


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "code": code,
            "reason": reason,
            "message": message,
        },
        status=code,
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ReadinessController:
    """Plays kwok: rolls out workloads and gives LoadBalancer Services an ingress, at once.

    While `paused`, nothing changes; `resume()` catches up with everything stored.
    """

    emulator: KubeEmulator
    paused: bool = False
    ingress_ip: str | None = None
    """Give load balancers this IP instead of a `<namespace>.tenants.nest.test` hostname."""

    def __post_init__(self) -> None:
        self.emulator.hooks.append(self._on_change)

    def resume(self) -> None:
        self.paused = False
        for resource in ("apps/v1/deployments", "apps/v1/statefulsets", "v1/services"):
            for obj in self.emulator.items(resource):
                self._on_change(resource, obj)

    def _on_change(self, resource: str, obj: Obj) -> None:
        if self.paused:
            return
        if resource in ("apps/v1/deployments", "apps/v1/statefulsets"):
            replicas = int(obj.get("spec", {}).get("replicas", 1))
            generation = obj["metadata"].get("generation", 1)
            obj["status"] = {
                "observedGeneration": generation,
                "replicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "updatedReplicas": replicas,
                "currentRevision": f"rev-{generation}",
                "updateRevision": f"rev-{generation}",
            }
        elif resource == "v1/services" and obj.get("spec", {}).get("type") == "LoadBalancer":
            ingress = (
                {"ip": self.ingress_ip}
                if self.ingress_ip
                else {"hostname": tenant_hostname(obj["metadata"]["namespace"])}
            )
            obj["status"] = {"loadBalancer": {"ingress": [ingress]}}
        elif resource == "v1/services":
            obj["status"] = {"loadBalancer": {}}


@dataclass
class TenantApis:
    """Every tenant cluster's API on one TLS port, told apart by SNI and Host.

    The server certificate and the CA that client certificates must chain to are read from
    the management emulator's `apiserver` and `ca` Secrets of the cluster's namespace at each
    handshake, so they follow whatever the provisioner issued.
    """

    management: KubeEmulator
    directory: Path
    emulators: dict[str, KubeEmulator] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    """Namespaces whose tenant API refuses to answer (503)."""
    port: int = 0
    node_address: str | None = None
    """Also serve each NodePort cluster's API on `<node_address>:<its nodePort>` (a loopback
    address), as kube-proxy would on a node, once its `kube-apiserver` Service has a port."""
    _contexts: dict[bytes, ssl.SSLContext] = field(default_factory=dict)
    _node_sites: dict[int, aiohttp.web.TCPSite | None] = field(default_factory=dict)
    _runners: list[aiohttp.web.ServerRunner] = field(default_factory=list)
    _starting: set[asyncio.Task[None]] = field(default_factory=set)

    def emulator(self, namespace: str) -> KubeEmulator:
        if namespace not in self.emulators:
            self.emulators[namespace] = KubeEmulator(requires_namespaces=False)
        return self.emulators[namespace]

    def _secret(self, namespace: str, name: str) -> dict[str, bytes]:
        secret = self.management.get("v1/secrets", namespace, name) or {"data": {}}
        return {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}

    def _context_for(self, namespace: str) -> ssl.SSLContext | None:
        server = self._secret(namespace, "apiserver")
        ca = self._secret(namespace, "ca")
        if "tls.crt" not in server or "tls.crt" not in ca:
            return None
        key = server["tls.crt"] + ca["tls.crt"]
        if key not in self._contexts:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False) as chain:
                chain.write(server["tls.crt"] + server["tls.key"])
            context.load_cert_chain(chain.name)
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=ca["tls.crt"].decode())
            self._contexts[key] = context
        return self._contexts[key]

    def _sni(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
        if server_name and server_name.endswith(f".{TENANT_DOMAIN}"):
            context = self._context_for(server_name.removesuffix(f".{TENANT_DOMAIN}"))
            if context is not None:
                sock.context = context
                return None
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    async def _handle(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        host = (raw.host or "").split(":")[0]
        namespace = host.removesuffix(f".{TENANT_DOMAIN}")
        if namespace in self.down:
            return _status(503, "ServiceUnavailable", "the tenant API is down")
        return await self.emulator(namespace)(raw)

    def _on_service(self, resource: str, obj: Obj) -> None:
        if self.node_address is None or resource != "v1/services":
            return
        spec = obj.get("spec", {})
        if spec.get("type") != "NodePort" or obj["metadata"]["name"] != "kube-apiserver":
            return
        for port in spec.get("ports", []):
            number = port.get("nodePort")
            if number and int(number) not in self._node_sites:
                self._node_sites[int(number)] = None
                task = asyncio.get_running_loop().create_task(
                    self._serve_node_port(obj["metadata"]["namespace"], int(number))
                )
                self._starting.add(task)
                task.add_done_callback(self._starting.discard)

    async def _serve_node_port(self, namespace: str, number: int) -> None:
        """One cluster's API on `<node_address>:<number>` (no SNI for an address: fixed)."""

        def pick(sock: ssl.SSLObject, _: str | None, __: ssl.SSLContext) -> int | None:
            context = self._context_for(namespace)
            if context is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            sock.context = context
            return None

        async def handle(raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
            if namespace in self.down:
                return _status(503, "ServiceUnavailable", "the tenant API is down")
            return await self.emulator(namespace)(raw)

        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.sni_callback = pick  # type: ignore[assignment]
        runner = aiohttp.web.ServerRunner(aiohttp.web.Server(handle))
        await runner.setup()
        self._runners.append(runner)
        site = aiohttp.web.TCPSite(runner, self.node_address, number, ssl_context=base)
        await site.start()
        self._node_sites[number] = site

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[TenantApis]:
        """Serve on 127.0.0.1 and route `*.tenants.nest.test` there in this process."""
        self.management.hooks.append(self._on_service)
        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.sni_callback = self._sni  # type: ignore[assignment]
        server = aiohttp.web.Server(self._handle)
        runner = aiohttp.web.ServerRunner(server)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=base)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pattern = re.compile(rf".*\.{re.escape(TENANT_DOMAIN)}")
        try:
            async with kmock.AiohttpInterceptor("127.0.0.1", self.port, pattern):
                yield self
        finally:
            self.management.hooks.remove(self._on_service)
            for task in list(self._starting):
                task.cancel()
            for extra in self._runners:
                await extra.cleanup()
            await runner.cleanup()


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for the (plain HTTP) management emulator."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "emulator", "user": "test"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(document))
    return path
