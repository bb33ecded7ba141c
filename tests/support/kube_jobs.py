"""A "kubelet" for batch/v1 Jobs in the Kubernetes emulator: it RUNS each Job's container
command as a local process and reports the outcome in the Job's status, as a node would.

Only what Nest's restore Jobs use is supported: one container, `command` + `args` with
`$(VAR)` references, `env` values and `secretKeyRef`s (read from the emulator's Secrets),
`persistentVolumeClaim` volumes (each claim is a directory under `volumes/<namespace>/`, and
the mount path is rewritten to it in the arguments), `backoffLimit` retries. `python` runs as
the test's interpreter, from the repository root.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.kube_emulator import KubeEmulator

JOBS = "batch/v1/jobs"
ROOT = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass
class JobRun:
    namespace: str
    name: str
    argv: list[str]
    returncode: int
    output: str


@dataclass
class JobKubelet:
    emulator: KubeEmulator
    volumes: Path
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every container (e.g. NEST_ETCDUTL)."""
    paused: bool = False
    """While set, Jobs are noted but not started; `resume()` starts them."""
    runs: list[JobRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.emulator.hooks.append(self._on_change)

    def volume(self, namespace: str, claim: str) -> Path:
        return self.volumes / namespace / claim

    def resume(self) -> None:
        self.paused = False
        for job in self.emulator.items(JOBS):
            self._on_change(JOBS, job)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def _on_change(self, resource: str, obj: dict[str, Any]) -> None:
        if resource != JOBS or self.paused:
            return
        uid = obj["metadata"]["uid"]
        if uid in self._seen or (obj.get("status") or {}).get("conditions"):
            return
        self._seen.add(uid)
        task = asyncio.get_running_loop().create_task(self._guarded(obj))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, job: dict[str, Any]) -> None:
        try:
            await self._run(job)
        except Exception as exc:  # a broken Job spec: the Job fails, the test sees why
            meta = job["metadata"]
            self.errors.append(f"{meta['name']}: {type(exc).__name__}: {exc}")
            self._report(meta["namespace"], meta["name"], False, 1)

    async def _run(self, job: dict[str, Any]) -> None:
        namespace = job["metadata"]["namespace"]
        name = job["metadata"]["name"]
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        env.update(self.env)
        for item in container.get("env", []):
            env[item["name"]] = self._value(namespace, item)
        mounts = {}
        for mount in container.get("volumeMounts", []):
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            host = self.volume(namespace, volume["persistentVolumeClaim"]["claimName"])
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = str(host)
        argv = [self._expand(arg, env, mounts) for arg in container["command"] + container["args"]]
        if argv[0] == "python":
            argv[0] = sys.executable
        if pod.get("hostAliases"):
            argv = self._with_host_aliases(namespace, name, pod["hostAliases"], argv)
        attempts = int(job["spec"].get("backoffLimit", 6)) + 1
        succeeded = False
        for _ in range(attempts):
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
            out, _ = await process.communicate()
            assert process.returncode is not None
            self.runs.append(JobRun(namespace, name, argv, process.returncode, out.decode()))
            if process.returncode == 0:
                succeeded = True
                break
        self._report(namespace, name, succeeded, attempts)

    def _with_host_aliases(
        self, namespace: str, name: str, aliases: list[dict[str, Any]], argv: list[str]
    ) -> list[str]:
        """Run `argv` seeing the pod's /etc/hosts, as a kubelet writes it for `hostAliases`:
        a private mount namespace with a hosts file bind-mounted over /etc/hosts."""
        unshare = shutil.which("unshare")
        if unshare is None or os.geteuid() != 0:
            raise RuntimeError("hostAliases need unshare and root to bind-mount /etc/hosts")
        hosts = self.volumes / namespace / f".{name}.hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        lines = [Path("/etc/hosts").read_text()]
        lines += [f"{alias['ip']} {' '.join(alias['hostnames'])}" for alias in aliases]
        hosts.write_text("\n".join(lines) + "\n")
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return [unshare, "-m", "--propagation", "private", "sh", "-c", script, str(hosts), *argv]

    def _report(self, namespace: str, name: str, succeeded: bool, attempts: int) -> None:
        job = self.emulator.get(JOBS, namespace, name)
        if job is None:
            return  # deleted meanwhile
        condition = "Complete" if succeeded else "Failed"
        job["status"] = {
            "succeeded": 1 if succeeded else 0,
            "failed": 0 if succeeded else attempts,
            "conditions": [
                {
                    "type": condition,
                    "status": "True",
                    "reason": "Completed" if succeeded else "BackoffLimitExceeded",
                    "message": "" if succeeded else "Job has reached the specified backoff limit",
                }
            ],
        }
        self.emulator.touch(JOBS, job)

    def _value(self, namespace: str, item: dict[str, Any]) -> str:
        if "value" in item:
            return str(item["value"])
        ref = item["valueFrom"]["secretKeyRef"]
        secret = self.emulator.get("v1/secrets", namespace, ref["name"])
        if secret is None:
            raise RuntimeError(f"Secret {ref['name']} is missing for a Job")
        return base64.b64decode(secret["data"][ref["key"]]).decode()

    @staticmethod
    def _expand(arg: str, env: dict[str, str], mounts: dict[str, str]) -> str:
        arg = _VARIABLE.sub(lambda m: env.get(m.group(1), m.group(0)), arg)
        for mount_path, host in mounts.items():
            arg = arg.replace(mount_path, host)
        return arg
