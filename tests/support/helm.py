"""The real Helm library (helm-sdkpy) for tests, in a Python 3.12 venv of its own.

helm-sdkpy (Helm 4 built as a shared library, with cffi bindings) needs Python 3.12; the test
suite runs on 3.11. So `helm_python()` prepares, once per machine, a 3.12 venv with a pinned
helm-sdkpy under `~/.cache/nest-test/` (keyed by the version; a file lock makes concurrent
pytest-xdist workers and sessions wait for one another), and `lint()` / `render()` run a small
script in it and read its JSON answer.

helm-sdkpy has no `helm template` and no dry run: `Install` always talks to a cluster. So
`render()` installs into a stand-in API server (inside the script, on 127.0.0.1) that answers
discovery for the kinds a chart may use, 404 to every GET and echoes every create; releases are
kept in Helm's memory driver. The manifest and NOTES come from the release Helm returns. A kind
missing from `RESOURCES` makes the install fail with Helm's own "no matches for kind" error.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HELM_SDKPY_VERSION = "0.1.32"
"""The helm-sdkpy release the venv gets (Helm 4 inside)."""

KUBE_VERSION = "v1.33.0"
"""What the stand-in API server reports (`.Capabilities.KubeVersion`)."""

RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("persistentvolumeclaims", "PersistentVolumeClaim", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "rbac.authorization.k8s.io/v1": [
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
}
"""Kinds the stand-in API server knows: group/version -> (plural, kind, namespaced)."""

SEVERITIES = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


class HelmUnavailable(Exception):
    """No Python 3.12 here, or helm-sdkpy could not be installed into its venv."""


class HelmFailed(Exception):
    """The helm script itself broke (not a lint finding or a render error)."""


@dataclass(frozen=True)
class LintMessage:
    severity: str
    path: str


@dataclass(frozen=True)
class LintResult:
    messages: list[LintMessage]
    errors: int
    """How many errors Helm reported (helm-sdkpy returns their text as `{}`, so only a count)."""

    def findings(self, at_least: str = "WARNING") -> list[LintMessage]:
        """Messages at `at_least` or worse: what `helm lint --strict` fails on by default."""
        floor = next(k for k, v in SEVERITIES.items() if v == at_least)
        ranks = {v: k for k, v in SEVERITIES.items()}
        return [m for m in self.messages if ranks.get(m.severity, 0) >= floor]


@dataclass(frozen=True)
class Rendered:
    manifest: str
    notes: str

    def objects(self) -> list[dict[str, Any]]:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return [doc for doc in yaml.load_all(self.manifest, Loader=loader) if doc]


@dataclass(frozen=True)
class RenderError:
    message: str


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nest-test"


def find_python312() -> str | None:
    """A Python 3.12 interpreter: pyenv's 3.12.1, python3.12 on PATH, or any pyenv 3.12."""
    candidates: list[str] = []
    if pyenv := shutil.which("pyenv"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [pyenv, "which", "python"],
                env={**os.environ, "PYENV_VERSION": "3.12.1"},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if found.returncode == 0 and found.stdout.strip():
                candidates.append(found.stdout.strip())
    if on_path := shutil.which("python3.12"):
        candidates.append(on_path)
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.12.*/bin/python")))
    for candidate in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 12))"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if probe.stdout.strip() == "True":
                return candidate
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def _prepare() -> Path | HelmUnavailable:
    try:
        return _prepare_venv()
    except HelmUnavailable as exc:
        return exc  # remembered: one failed attempt per process is enough


def helm_python() -> Path:
    """The helm-sdkpy venv's 3.12 interpreter, created on first use (or HelmUnavailable)."""
    prepared = _prepare()
    if isinstance(prepared, HelmUnavailable):
        raise prepared
    return prepared


def _prepare_venv() -> Path:
    venv = _cache_root() / f"helm-venv-{HELM_SDKPY_VERSION}"
    python = venv / "bin" / "python"
    ready = venv / ".nest-ready"
    with _locked(venv.with_name(venv.name + ".lock")):
        if ready.exists() and python.exists():
            return python
        base = find_python312()
        if base is None:
            raise HelmUnavailable(
                "helm-sdkpy needs Python 3.12: none found (pyenv 3.12.1, python3.12 on PATH, "
                "~/.pyenv/versions/3.12.*)"
            )
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [base, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", f"helm-sdkpy=={HELM_SDKPY_VERSION}"],
            [str(python), "-c", "import helm_sdkpy; helm_sdkpy.get_version()"],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                shutil.rmtree(venv, ignore_errors=True)
                raise HelmUnavailable(f"{' '.join(step[1:])}: {exc}") from None
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                raise HelmUnavailable(
                    f"could not set up helm-sdkpy {HELM_SDKPY_VERSION} with {base}: "
                    f"{' '.join(step[1:])}: " + " | ".join(tail)
                )
        ready.write_text(HELM_SDKPY_VERSION + "\n")
        return python


def _run(request: Mapping[str, Any]) -> Any:
    python = helm_python()
    with tempfile.TemporaryDirectory(prefix="nest-helm-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
        env |= {
            # In the process environment: the Go library does not see later os.environ changes.
            "HELM_DRIVER": "memory",
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
            "NEST_HELM_WORKDIR": home,
        }
        done = subprocess.run(
            [str(python), "-c", _SCRIPT],
            input=json.dumps({**request, "resources": RESOURCES, "kube_version": KUBE_VERSION}),
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise HelmFailed(f"helm script exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _merged(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merged(base.get(k), v) for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def lint(chart: Path, values: Mapping[str, Any] | None = None) -> LintResult:
    """`helm lint` of the chart; with `values`, of a copy whose values.yaml has them merged in.

    helm-sdkpy's Lint takes no values of its own, hence the copy.
    """
    with tempfile.TemporaryDirectory(prefix="nest-chart-") as tmp:
        target = chart
        if values:
            target = Path(tmp) / chart.name
            shutil.copytree(chart, target)
            defaults = yaml.safe_load((chart / "values.yaml").read_text()) or {}
            (target / "values.yaml").write_text(yaml.safe_dump(_merged(defaults, dict(values))))
        answer = _run({"action": "lint", "chart": str(target)})
    messages = [
        LintMessage(SEVERITIES.get(m.get("Severity", 0), "UNKNOWN"), m.get("Path", ""))
        for m in answer.get("Messages") or []
    ]
    return LintResult(messages, len(answer.get("Errors") or []))


def render(
    chart: Path,
    value_sets: Mapping[str, Mapping[str, Any]],
    *,
    release: str = "nest",
    namespace: str = "nest",
) -> dict[str, Rendered | RenderError]:
    """What `helm install` would apply for each set of values (one helm process for all)."""
    answer = _run(
        {
            "action": "render",
            "chart": str(chart),
            "release": release,
            "namespace": namespace,
            "sets": {name: dict(values) for name, values in value_sets.items()},
        }
    )
    results: dict[str, Rendered | RenderError] = {}
    for name, outcome in answer.items():
        if "error" in outcome:
            results[name] = RenderError(outcome["error"])
        else:
            results[name] = Rendered(outcome["manifest"], outcome["notes"])
    return results


# Runs in the helm-sdkpy venv (Python 3.12, standard library + helm_sdkpy only).
_SCRIPT = r"""
import asyncio, json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

request = json.load(sys.stdin)
resources = request["resources"]


class StandIn(BaseHTTPRequestHandler):
    # Just enough of a Kubernetes API server for `helm install`: discovery, 404, echo.
    def log_message(self, *args):
        pass

    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/version":
            major, minor = request["kube_version"].lstrip("v").split(".")[:2]
            return self.answer(200, {"major": major, "minor": minor,
                                     "gitVersion": request["kube_version"],
                                     "platform": "linux/amd64"})
        if path == "/api":
            return self.answer(200, {"kind": "APIVersions", "versions": ["v1"],
                                     "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = []
            for gv in resources:
                if "/" in gv:
                    group, version = gv.split("/")
                    entry = {"groupVersion": gv, "version": version}
                    groups.append({"name": group, "versions": [entry],
                                   "preferredVersion": entry})
            return self.answer(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                     "groups": groups})
        for gv, kinds in resources.items():
            if path == ("/apis/" + gv if "/" in gv else "/api/" + gv):
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                listed = [{"name": plural, "singularName": kind.lower(), "namespaced": ns,
                           "kind": kind, "verbs": verbs} for plural, kind, ns in kinds]
                return self.answer(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                         "groupVersion": gv, "resources": listed})
        return self.answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404, "message": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self.answer(201, json.loads(body))


import helm_sdkpy

workdir = os.environ["NEST_HELM_WORKDIR"]
if request["action"] == "lint":
    config = helm_sdkpy.Configuration(namespace="default")
    print(json.dumps(asyncio.run(helm_sdkpy.Lint(config).run(request["chart"]))))
    sys.exit(0)

server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
threading.Thread(target=server.serve_forever, daemon=True).start()
kubeconfig = os.path.join(workdir, "kubeconfig")
with open(kubeconfig, "w") as f:
    f.write(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {
            "server": "http://127.0.0.1:%d" % server.server_address[1]}}],
        "users": [{"name": "standin", "user": {"token": "standin"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
    }))

results = {}
for name, values in request["sets"].items():
    config = helm_sdkpy.Configuration(namespace=request["namespace"], kubeconfig=kubeconfig)
    try:
        release = asyncio.run(helm_sdkpy.Install(config).run(
            request["release"], request["chart"], values=values, wait=False, timeout=60))
    except helm_sdkpy.HelmError as exc:
        results[name] = {"error": str(exc)}
    else:
        results[name] = {"manifest": release.get("manifest", ""),
                         "notes": (release.get("info") or {}).get("notes", "")}
server.shutdown()
print(json.dumps(results))
"""

if __name__ == "__main__":  # pragma: no cover - a manual check: python -m tests.support.helm
    print(helm_python(), file=sys.stderr)
