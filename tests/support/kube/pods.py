"""One pod on a harness node, as the kubelet runs it: pretended, held, or really run.

- `fake` (the default, as kwok does): the pod is reported Running with every container ready,
  nothing runs. A pod of a Job is reported Succeeded.
- `hold`: the pod stays Pending (a node that cannot start it); a fake pod already running is
  reported not ready.
- `real`: every container runs as a process of the binaries of its image's version
  (`images.plan`), in the pod's own network namespace (its pod IP on the harness bridge) and a
  private mount namespace: an overlay of the host's root as the image, the pod's volumes
  (Secret, ConfigMap, projected, emptyDir, PersistentVolumeClaim, hostPath) materialized at
  their mount paths, `/etc/hosts` from the cluster's DNS, and the container's security context
  (user, group, capabilities, no_new_privs) applied with `setpriv`. Probes (startup, readiness,
  liveness: httpGet and tcpSocket) are run from the node against the pod IP, their timings
  multiplied by the harness's probe scale; containers are restarted by the pod's
  restartPolicy with back-off; deletion sends SIGTERM, waits the grace period, then SIGKILL.

Every change is reported through the pod's `status` subresource; a pod the API server marked
for deletion is finalized (deleted with grace period 0) once its containers are gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.kube import images
from tests.support.kube.api import Api, ApiError, Obj
from tests.support.kube.network import Bridge

log = logging.getLogger(__name__)

FAKE, HOLD, REAL = "fake", "hold", "real"
_VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


async def wait_process(process: subprocess.Popen[bytes]) -> int:
    """Wait for a child without holding a thread: its pidfd becomes readable when it exits."""
    if process.poll() is not None:
        return process.returncode
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(process.pid)
    exited = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        if process.poll() is None:
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return process.wait()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known variables replaced, `$$` an escaped `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VARIABLE.sub(replace, text)


@dataclass
class Runtime:
    """What every pod of one harness shares."""

    api: Api
    bridge: Bridge
    root: Path
    """Per-pod directories live under `root/pods/<uid>`, logs under `root/logs`."""
    etc: Path
    """Directory whose `hosts` is every pod's /etc/hosts (rewritten atomically by the DNS)."""
    probe_scale: float = 1.0
    node_ips: dict[str, str] = field(default_factory=dict)


class PodError(Exception):
    """The pod cannot start yet (a missing Secret, an unbound claim); retried."""


@dataclass
class Container:
    spec: Obj
    init: bool = False
    process: subprocess.Popen[bytes] | None = None
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    restarts: int = 0
    started: bool = False
    ready: bool = False
    exit_code: int | None = None
    probe_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self, container_id: str) -> Obj:
        status: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": self.spec.get("image", ""),
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restarts,
            "state": self.state,
        }
        if "running" in self.state or "terminated" in self.state:
            status["containerID"] = f"harness://{container_id}"
        if self.last_state:
            status["lastState"] = self.last_state
        return status


class Pod:
    """The harness's handle on one pod bound to one of its nodes."""

    def __init__(self, runtime: Runtime, pod: Obj, mode: str, on_gone: Callable[[Pod], None]):
        self.runtime = runtime
        self.obj = pod
        self.mode = mode
        self.on_gone = on_gone
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.short = self.uid.replace("-", "")[:10]
        self.ip: str | None = (pod.get("status") or {}).get("podIP")
        self.netns: str | None = None
        self.directory = runtime.root / "pods" / self.uid
        self.logs = runtime.root / "logs" / self.namespace / self.name
        spec = pod["spec"]
        self.containers = [Container(c) for c in spec.get("containers", [])]
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers", [])]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.phase = "Pending"
        self.message: str | None = None
        self.reason: str | None = None
        self.initialized = not self.init_containers
        self.start_time: str | None = None
        self.deleting = False
        self.held = mode == HOLD
        self.started_real = False
        """Its containers were started for real: a hold no longer applies to it."""
        self.task: asyncio.Task[None] | None = None
        self._status_dirty = asyncio.Event()
        self.status_task: asyncio.Task[None] | None = None
        self._volumes: dict[str, Path] = {}
        self._transitions: dict[str, tuple[str, str]] = {}
        self._wake = asyncio.Event()
        self._stopper: asyncio.Task[None] | None = None
        self.dns: Any = None
        """The agent's `Dns`, which writes this pod's hosts file."""
        self._plans: dict[str, images.ImagePlan] = {}

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    # Life cycle

    def start(self) -> None:
        self.status_task = asyncio.create_task(self._status_loop(), name=f"status {self.name}")
        self.task = asyncio.create_task(self._run(), name=f"pod {self.namespace}/{self.name}")

    def update(self, pod: Obj, mode: str) -> None:
        """A newer version of the pod object (or a new mode from its namespace)."""
        self.obj = pod
        if pod["metadata"].get("deletionTimestamp") and not self.deleting:
            self.deleting = True
            self._stopper = asyncio.create_task(self._stop_containers(self._grace()))
            self._wake.set()
        if mode != self.mode:
            previous, self.mode = self.mode, mode
            # A node that cannot start pods holds the ones not started yet; what runs for real
            # keeps running (fake pods are reported not ready, see `_run_fake`).
            if (previous == HOLD or mode == HOLD) and not self.started_real:
                self.held = mode == HOLD
                self._wake.set()
            if self.mode != REAL and previous == FAKE:
                self._report()

    async def _run(self) -> None:
        try:
            await self._life()
        except asyncio.CancelledError:
            await self._stop_containers(grace=0)
            self._cleanup()
            raise
        except Exception:
            log.exception("pod %s/%s failed in the harness", self.namespace, self.name)
            self.reason, self.message = "HarnessError", "the harness failed; see its log"
            self._report()
            while not self.deleting:
                await self._sleep(1.0)
            await self._finalize()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _life(self) -> None:
        while self.held and not self.deleting:
            self._report()
            await self._sleep(3600)
        if self.deleting:
            await self._finalize()
            return
        if self.ip is None:
            self.ip = self.runtime.bridge.allocate_pod_ip()
        else:
            self.runtime.bridge.reserve_pod_ip(self.ip)
        self.start_time = self.start_time or now()
        if self.mode == REAL:
            await self._run_real()
        else:
            await self._run_fake()
        await self._finalize()

    async def _run_fake(self) -> None:
        job = any(
            ref.get("kind") == "Job" for ref in self.obj["metadata"].get("ownerReferences", [])
        )
        self.initialized = True
        for container in self.init_containers:
            container.state = {"terminated": {"exitCode": 0, "reason": "Completed"}}
        started = now()
        for container in self.containers:
            container.started = True
            container.ready = True
            container.state = {"running": {"startedAt": started}}
        self.phase = "Running"
        self._report()
        if job and self.restart_policy != "Always":
            for container in self.containers:
                container.ready = False
                container.started = False
                container.state = {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": started,
                        "finishedAt": now(),
                    }
                }
            self.phase = "Succeeded"
            self._report()
        while not self.deleting:
            ready = self.mode != HOLD
            for container in self.containers:
                if "running" in container.state:
                    container.ready = ready
            self._report()
            await self._sleep(3600)

    # Real containers

    async def _run_real(self) -> None:
        while not self.deleting:
            try:
                await self._prepare()
                break
            except (PodError, images.ImageNotRunnable) as exc:
                self.reason, self.message = "ContainerCreating", str(exc)
                for container in self.init_containers + self.containers:
                    container.state = {
                        "waiting": {"reason": "ContainerCreating", "message": str(exc)}
                    }
                self._report()
                await self._sleep(2.0 * max(self.runtime.probe_scale, 0.25))
        if self.deleting:
            return
        self.started_real = True
        self.reason = self.message = None
        for container in self.init_containers:
            while not self.deleting:
                code = await self._run_to_completion(container)
                if code == 0:
                    break
                if self.restart_policy == "Never":
                    self.phase = "Failed"
                    self._report()
                    await self._wait_deleted()
                    return
                await self._sleep(self._backoff(container))
        if self.deleting:
            return
        self.initialized = True
        self.phase = "Running"
        await asyncio.gather(*(self._keep_running(c) for c in self.containers))
        if not self.deleting:
            codes = [c.exit_code for c in self.containers]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            self._report()
            await self._wait_deleted()

    async def _wait_deleted(self) -> None:
        while not self.deleting:
            await self._sleep(3600)

    def _backoff(self, container: Container) -> float:
        delay = min(10.0 * 2.0 ** max(container.restarts - 1, 0), 300.0)
        return float(delay * self.runtime.probe_scale)

    async def _run_to_completion(self, container: Container) -> int:
        await self._spawn(container)
        assert container.process is not None
        code = await wait_process(container.process)
        self._terminated(container, code)
        return code

    async def _keep_running(self, container: Container) -> None:
        while not self.deleting:
            await self._spawn(container)
            process = container.process
            assert process is not None
            container.probe_task = asyncio.create_task(self._probe(container))
            code = await wait_process(process)
            container.probe_task.cancel()
            self._terminated(container, code)
            if self.deleting:
                return
            if self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0):
                return
            container.restarts += 1
            container.state = {
                "waiting": {"reason": "CrashLoopBackOff", "message": f"exited with {code}"}
            }
            self._report()
            await self._sleep(self._backoff(container))

    def _terminated(self, container: Container, code: int) -> None:
        started = container.state.get("running", {}).get("startedAt", now())
        container.exit_code = code
        container.ready = False
        container.started = False
        reason = "Completed" if code == 0 else ("OOMKilled" if code == -9 else "Error")
        container.last_state = {}
        container.state = {
            "terminated": {
                "exitCode": code if code >= 0 else 128 - code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now(),
            }
        }
        if container.restarts or not container.init:
            container.last_state = {"terminated": dict(container.state["terminated"])}
        self._report()

    async def _prepare(self) -> None:
        """Network namespace, volumes and image binaries; raises PodError until possible."""
        plans: dict[str, images.ImagePlan] = {}
        for container in self.init_containers + self.containers:
            plans[container.name] = await asyncio.to_thread(images.plan, container.spec["image"])
        self._plans = plans
        await self._materialize_volumes()
        etc = self.directory / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        search = f"{self.namespace}.svc.cluster.local svc.cluster.local cluster.local"
        (etc / "resolv.conf").write_text(
            f"search {search}\nnameserver 127.0.0.1\noptions ndots:5\n"
        )
        (etc / "hostname").write_text(self.obj["spec"].get("hostname", self.name) + "\n")
        if self.dns is not None:
            self.dns.write_pod(self)
        if self.netns is None:
            assert self.ip is not None
            self.netns = await asyncio.to_thread(self.runtime.bridge.attach, self.short, self.ip)
        self.logs.mkdir(parents=True, exist_ok=True)

    async def _materialize_volumes(self) -> None:
        base = self.directory / "volumes"
        for volume in self.obj["spec"].get("volumes", []):
            name = volume["name"]
            target = base / name
            if "persistentVolumeClaim" in volume:
                self._volumes[name] = await self._claim_path(volume["persistentVolumeClaim"])
                continue
            if "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type", "") in ("DirectoryOrCreate", ""):
                    host.mkdir(parents=True, exist_ok=True)
                self._volumes[name] = host
                continue
            files: dict[str, tuple[bytes, int]] = {}
            if "secret" in volume:
                source = volume["secret"]
                data = await self._data("secrets", source["secretName"], source.get("optional"))
                files = self._project(data, source.get("items"), source.get("defaultMode", 0o644))
            elif "configMap" in volume:
                source = volume["configMap"]
                data = await self._data("configmaps", source["name"], source.get("optional"))
                files = self._project(data, source.get("items"), source.get("defaultMode", 0o644))
            elif "projected" in volume:
                mode = volume["projected"].get("defaultMode", 0o644)
                for item in volume["projected"].get("sources", []):
                    if "secret" in item:
                        src = item["secret"]
                        data = await self._data("secrets", src["name"], src.get("optional"))
                        files |= self._project(data, src.get("items"), mode)
                    elif "configMap" in item:
                        src = item["configMap"]
                        data = await self._data("configmaps", src["name"], src.get("optional"))
                        files |= self._project(data, src.get("items"), mode)
                    elif "downwardAPI" in item:
                        for entry in item["downwardAPI"].get("items", []):
                            value = self._field(entry["fieldRef"]["fieldPath"]).encode()
                            files[entry["path"]] = (value, entry.get("mode", mode))
                    elif "serviceAccountToken" in item:
                        token = await self._token(item["serviceAccountToken"])
                        files[item["serviceAccountToken"]["path"]] = (token, mode)
                    else:
                        raise PodError(f"projected source {sorted(item)} is not supported here")
            elif "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
                self._volumes[name] = target
                continue
            else:
                raise PodError(f"volume {name}: {sorted(volume)} is not supported by the harness")
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for relative, (content, file_mode) in files.items():
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                path.chmod(file_mode)
            self._volumes[name] = target

    async def _data(self, resource: str, name: str, optional: bool | None) -> dict[str, bytes]:
        obj = await self.runtime.api.get(f"/api/v1/namespaces/{self.namespace}/{resource}/{name}")
        if obj is None:
            if optional:
                return {}
            raise PodError(f"{resource[:-1]} {name!r} not found")
        if resource == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        found = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        found |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        return found

    async def _token(self, source: Obj) -> bytes:
        """A bound service-account token from the TokenRequest API, as the kubelet gets one."""
        account = self.obj["spec"].get("serviceAccountName") or "default"
        spec: Obj = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self.name,
                "uid": self.uid,
            },
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        try:
            answer = await self.runtime.api.create(
                f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as exc:
            raise PodError(f"token for service account {account!r}: {exc}") from exc
        return str(answer["status"]["token"]).encode()

    @staticmethod
    def _project(
        data: dict[str, bytes], items: list[Obj] | None, mode: int
    ) -> dict[str, tuple[bytes, int]]:
        if items is None:
            return {k: (v, mode) for k, v in data.items()}
        projected = {}
        for item in items:
            if item["key"] not in data:
                raise PodError(f"key {item['key']!r} not found")
            projected[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return projected

    async def _claim_path(self, source: Obj) -> Path:
        claim = await self.runtime.api.get(
            f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{source['claimName']}"
        )
        if claim is None:
            raise PodError(f"persistentvolumeclaim {source['claimName']!r} not found")
        volume_name = claim["spec"].get("volumeName")
        if not volume_name or (claim.get("status") or {}).get("phase") != "Bound":
            raise PodError(f"persistentvolumeclaim {source['claimName']!r} is not bound")
        volume = await self.runtime.api.get(f"/api/v1/persistentvolumes/{volume_name}")
        if volume is None:
            raise PodError(f"persistentvolume {volume_name!r} not found")
        spec = volume["spec"]
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not path:
            raise PodError(f"persistentvolume {volume_name!r} is neither hostPath nor local")
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)

    def _field(self, path: str) -> str:
        meta = self.obj["metadata"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.obj["spec"].get("nodeName", ""),
            "spec.serviceAccountName": self.obj["spec"].get("serviceAccountName", ""),
            "status.podIP": self.ip or "",
            "status.podIPs": self.ip or "",
            "status.hostIP": self.runtime.node_ips.get(self.obj["spec"].get("nodeName", ""), ""),
        }
        if path in simple:
            return str(simple[path])
        if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        raise PodError(f"fieldRef {path} is not supported by the harness")

    async def _environment(self, spec: Obj) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                data = await self._data("secrets", ref["name"], ref.get("optional"))
            else:
                ref = source["configMapRef"]
                data = await self._data("configmaps", ref["name"], ref.get("optional"))
            env |= {prefix + k: v.decode() for k, v in data.items()}
        for item in spec.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
                continue
            source = item.get("valueFrom", {})
            if "fieldRef" in source:
                env[item["name"]] = self._field(source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                kind = "secrets" if "secretKeyRef" in source else "configmaps"
                ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                data = await self._data(kind, ref["name"], ref.get("optional"))
                if ref["key"] in data:
                    env[item["name"]] = data[ref["key"]].decode()
                elif not ref.get("optional"):
                    raise PodError(f"key {ref['key']!r} not found in {kind[:-1]} {ref['name']!r}")
            elif "resourceFieldRef" in source:
                env[item["name"]] = "1"
            else:
                env[item["name"]] = ""
        return env

    def _security(self, spec: Obj) -> list[str]:
        pod_context = self.obj["spec"].get("securityContext") or {}
        context = {**pod_context, **(spec.get("securityContext") or {})}
        options: list[str] = []
        if context.get("allowPrivilegeEscalation") is False:
            options.append("--no-new-privs")
        capabilities = context.get("capabilities") or {}
        if "ALL" in (capabilities.get("drop") or []) and not context.get("privileged"):
            added = ",".join(f"+{c.lower()}" for c in capabilities.get("add") or [])
            keep = f"-all,{added}" if added else "-all"
            options += [f"--inh-caps={keep}", f"--bounding-set={keep}"]
            if added:
                options += [f"--ambient-caps={added}"]
        if "runAsUser" in context:
            options += [f"--reuid={context['runAsUser']}"]
        if "runAsGroup" in context:
            options += [f"--regid={context['runAsGroup']}", "--clear-groups"]
        return options

    async def _spawn(self, container: Container) -> None:
        spec = container.spec
        plan = self._plans[container.name]
        env = {"PATH": plan.path, "HOSTNAME": self.name, "HOME": "/root"}
        env |= await self._environment(spec)
        argv = [expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if not argv:
            raise PodError(f"container {container.name}: no command (image entrypoints unknown)")
        cdir = self.directory / "c" / container.name
        cdir.mkdir(parents=True, exist_ok=True)
        merged = f"{cdir}/m"
        hostname = (self.obj["spec"].get("hostname") or self.name)[:63]
        script = [
            "set -e",
            f"hostname {shlex.quote(hostname)}",
            f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(cdir))}",
            f"mkdir {cdir}/u {cdir}/w {merged}",
            f"mount -t overlay overlay -o lowerdir=/,upperdir={cdir}/u,workdir={cdir}/w {merged}",
            f"mount -t proc proc {merged}/proc",
            f"mount --rbind /dev {merged}/dev",
            f"mount --rbind /sys {merged}/sys",
            f"mount -t tmpfs tmpfs {merged}/tmp",
            f"mount -t tmpfs tmpfs {merged}/run",
        ]

        def bind_file(source: Path, target: str, read_only: bool = True) -> None:
            quoted = shlex.quote(f"{merged}{target}")
            script.append(f"mkdir -p $(dirname {quoted}) && touch {quoted}")
            script.append(f"mount --bind {shlex.quote(str(source))} {quoted}")
            if read_only:
                script.append(f"mount -o remount,bind,ro {quoted}")

        for target, source in plan.files.items():
            bind_file(source, target)
        # The pod's etc directory is bind-mounted whole, and /etc/hosts links into it, so the
        # DNS's atomic rewrites (a rename) are seen inside the container.
        script += [
            f"mkdir -p {merged}/run/harness-etc",
            f"mount --bind {self.directory}/etc {merged}/run/harness-etc",
        ]
        for name in ("hosts", "resolv.conf", "hostname"):
            script.append(f"ln -sf /run/harness-etc/{name} {merged}/etc/{name}")
        for mount in spec.get("volumeMounts", []):
            source = self._volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            target = shlex.quote(f"{merged}{mount['mountPath']}")
            script.append(f"mkdir -p {target}")
            script.append(f"mount --bind {shlex.quote(str(source))} {target}")
            if mount.get("readOnly"):
                script.append(f"mount -o remount,bind,ro {target}")
        workdir = spec.get("workingDir") or plan.workdir
        security = " ".join(shlex.quote(o) for o in self._security(spec))
        command = " ".join(shlex.quote(a) for a in argv)
        script.append(
            f"exec chroot {merged} /usr/bin/setpriv {security} "
            f"/usr/bin/env --chdir={shlex.quote(workdir)} {command}"
        )
        log_file = self.logs / f"{container.name}.log"
        assert self.netns is not None
        with log_file.open("ab") as out:
            out.write(f"--- {now()} starting {' '.join(argv)}\n".encode())
            out.flush()
            container.process = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "unshare",
                    "--uts",
                    "--ipc",
                    "sh",
                    "-c",
                    "\n".join(script),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        container.state = {"running": {"startedAt": now()}}
        probes = spec.get("startupProbe"), spec.get("readinessProbe")
        container.started = probes[0] is None
        container.ready = container.started and probes[1] is None and not container.init
        self._report()

    # Probes

    async def _probe(self, container: Container) -> None:
        spec = container.spec
        startup, readiness = spec.get("startupProbe"), spec.get("readinessProbe")
        liveness = spec.get("livenessProbe")
        if startup is not None:
            if not await self._until(container, startup, want=True):
                self._kill(container)
                return
            container.started = True
            container.ready = readiness is None
            self._report()
        tasks = []
        if readiness is not None:
            tasks.append(self._readiness(container, readiness))
        if liveness is not None:
            tasks.append(self._liveness(container, liveness))
        await asyncio.gather(*tasks)

    def _timing(self, probe: Obj, name: str, default: float) -> float:
        return float(probe.get(name, default)) * self.runtime.probe_scale

    async def _until(self, container: Container, probe: Obj, *, want: bool) -> bool:
        """Probe until `successThreshold` successes (True) or `failureThreshold` failures."""
        await asyncio.sleep(self._timing(probe, "initialDelaySeconds", 0))
        failures = 0
        while True:
            if await self._check(container, probe):
                return True
            failures += 1
            if failures >= int(probe.get("failureThreshold", 3)):
                return False
            await asyncio.sleep(self._timing(probe, "periodSeconds", 10))

    async def _readiness(self, container: Container, probe: Obj) -> None:
        await asyncio.sleep(self._timing(probe, "initialDelaySeconds", 0))
        successes = failures = 0
        while True:
            if await self._check(container, probe):
                successes, failures = successes + 1, 0
                if successes >= int(probe.get("successThreshold", 1)) and not container.ready:
                    container.ready = True
                    self._report()
            else:
                successes, failures = 0, failures + 1
                if failures >= int(probe.get("failureThreshold", 3)) and container.ready:
                    container.ready = False
                    self._report()
            await asyncio.sleep(self._timing(probe, "periodSeconds", 10))

    async def _liveness(self, container: Container, probe: Obj) -> None:
        await asyncio.sleep(self._timing(probe, "initialDelaySeconds", 0))
        failures = 0
        while True:
            if await self._check(container, probe):
                failures = 0
            else:
                failures += 1
                if failures >= int(probe.get("failureThreshold", 3)):
                    log.info(
                        "%s/%s %s: liveness failed, restarting",
                        self.namespace,
                        self.name,
                        container.name,
                    )
                    self._kill(container)
                    return
            await asyncio.sleep(self._timing(probe, "periodSeconds", 10))

    def _port(self, container: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for candidate in self.containers:
            for declared in candidate.spec.get("ports", []):
                if declared.get("name") == port:
                    return int(declared["containerPort"])
        raise PodError(f"container {container.name}: no port named {port!r}")

    async def _check(self, container: Container, probe: Obj) -> bool:
        timeout = max(float(probe.get("timeoutSeconds", 1)), 0.5)
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                host = get.get("host") or self.ip
                port = self._port(container, get["port"])
                scheme = get.get("scheme", "HTTP").lower()
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                async with httpx.AsyncClient(verify=context, timeout=timeout) as client:
                    response = await client.get(
                        f"{scheme}://{host}:{port}{get.get('path', '/')}", headers=headers
                    )
                return 200 <= response.status_code < 400
            if "tcpSocket" in probe:
                port = self._port(container, probe["tcpSocket"]["port"])
                host = probe["tcpSocket"].get("host") or self.ip
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                writer.close()
                return True
        except (httpx.HTTPError, OSError, TimeoutError, PodError):
            return False
        log.warning("%s/%s: probe %s not supported", self.namespace, self.name, sorted(probe))
        return False

    # Stopping

    def _kill(self, container: Container, sig: int = signal.SIGKILL) -> None:
        process = container.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)

    async def _stop_containers(self, grace: float) -> None:
        running = [
            c
            for c in self.init_containers + self.containers
            if c.process is not None and c.process.poll() is None
        ]
        for container in running:
            if container.probe_task is not None:
                container.probe_task.cancel()
            self._kill(container, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace
        for container in running:
            assert container.process is not None
            while container.process.poll() is None:
                if asyncio.get_running_loop().time() >= deadline:
                    self._kill(container)
                    await wait_process(container.process)
                    break
                await asyncio.sleep(0.05)

    def _grace(self) -> float:
        grace = self.obj["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.obj["spec"].get("terminationGracePeriodSeconds", 30)
        return float(grace)

    async def _finalize(self) -> None:
        """The pod was marked for deletion: stop everything, clean up, delete it for good."""
        if self._stopper is not None:
            await self._stopper
        await self._stop_containers(self._grace())
        self._cleanup()
        with contextlib.suppress(ApiError):
            await self.runtime.api.delete(
                self.path, gracePeriodSeconds=0, preconditions={"uid": self.uid}
            )
        self.on_gone(self)

    def _cleanup(self) -> None:
        if self.netns is not None:
            self.runtime.bridge.detach(self.short)
            self.netns = None
        if self.ip is not None:
            self.runtime.bridge.release_pod_ip(self.ip)
        # Claims and host paths live outside the pod's directory and outlive it.
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.status_task is not None:
            self.status_task.cancel()

    # Status

    def _report(self) -> None:
        self._status_dirty.set()

    def _condition(self, kind: str, ok: bool) -> Obj:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, now())
        return {"type": kind, "status": status, "lastTransitionTime": self._transitions[kind][1]}

    def status(self) -> Obj:
        scheduled = self._condition("PodScheduled", True)
        if self.held or self.ip is None:
            return {"phase": "Pending", "conditions": [scheduled]}
        ready = self.phase == "Running" and all(c.ready for c in self.containers)
        body: Obj = {
            "phase": self.phase,
            "hostIP": self.runtime.node_ips.get(self.obj["spec"].get("nodeName", ""), ""),
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", True),
                self._condition("Initialized", self.initialized),
                self._condition("Ready", ready),
                self._condition("ContainersReady", ready),
                scheduled,
            ],
            "containerStatuses": [c.status(f"{self.short}-{c.name}") for c in self.containers],
        }
        host_ips = body["hostIP"]
        if host_ips:
            body["hostIPs"] = [{"ip": host_ips}]
        if self.init_containers:
            body["initContainerStatuses"] = [
                c.status(f"{self.short}-{c.name}") for c in self.init_containers
            ]
        if self.reason:
            body["reason"], body["message"] = self.reason, self.message
        return body

    async def _status_loop(self) -> None:
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            body = self.status()
            try:
                await self.runtime.api.merge_patch(f"{self.path}/status", {"status": body})
            except ApiError as exc:
                if exc.status == 422:
                    log.error("status of %s/%s refused: %s", self.namespace, self.name, exc)
                elif exc.status not in (404, 409):
                    log.warning("status of %s/%s: %s", self.namespace, self.name, exc)
                    await asyncio.sleep(0.5)
                    self._status_dirty.set()
            except (httpx.HTTPError, OSError) as exc:
                log.warning("status of %s/%s: %s", self.namespace, self.name, exc)
                await asyncio.sleep(0.5)
                self._status_dirty.set()
