"""The real `helm` CLI for tests: lint, render, install and uninstall a chart.

The binary is Helm v4 built from its Go module (`tests.support.kube.binaries.helm()`, cached per
machine). Every call runs helm with fresh, temporary `HELM_CACHE_HOME`, `HELM_CONFIG_HOME`,
`HELM_DATA_HOME` and `HOME`, and without the caller's `HELM_*` / `KUBECONFIG` settings, so
nothing is read from or written to the user's home and no cluster is reached unless a kubeconfig
is passed explicitly (only `install` and `uninstall` take one).

Values are written to a file and passed with `--values`, as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.kube import binaries

SEVERITIES = ("INFO", "WARNING", "ERROR")
"""helm lint's severities, mildest first."""

_LINT_LINE = re.compile(r"^\[(INFO|WARNING|ERROR)\] ([^:]*): (.*)$")


class HelmError(Exception):
    """helm exited non-zero: the message is the command and what helm said on stderr."""

    def __init__(self, command: Sequence[str], stderr: str) -> None:
        self.command = list(command)
        self.stderr = stderr.strip()
        super().__init__(f"helm {' '.join(command)}: {self.stderr}")

    @property
    def message(self) -> str:
        """helm's error, without its `Error: ` prefix and the log lines before it."""
        at = self.stderr.rfind("\nError: ")
        if at >= 0:
            return self.stderr[at + len("\nError: ") :]
        return self.stderr.removeprefix("Error: ")


class RenderError(HelmError):
    """The chart did not render with these values (e.g. values.schema.json refused them)."""


class ReleaseFailed(HelmError):
    """`helm install` or `helm uninstall` failed against the cluster."""


@dataclass(frozen=True)
class LintMessage:
    severity: str
    path: str
    message: str


@dataclass(frozen=True)
class LintResult:
    passed: bool
    """helm lint --strict exited 0 (no error, and --strict: no warning either)"""
    messages: list[LintMessage]
    output: str
    """helm's stdout and stderr, for an assertion message"""

    @property
    def errors(self) -> list[LintMessage]:
        return [m for m in self.messages if m.severity == "ERROR"]

    def findings(self, at_least: str = "WARNING") -> list[LintMessage]:
        """Messages at `at_least` or worse: what `helm lint --strict` fails on."""
        floor = SEVERITIES.index(at_least)
        return [m for m in self.messages if SEVERITIES.index(m.severity) >= floor]


@dataclass(frozen=True)
class Release:
    """A release as `helm install --output json` reports it."""

    name: str
    namespace: str
    revision: int
    status: str
    manifest: str
    notes: str

    def objects(self) -> list[dict[str, Any]]:
        return parse_manifest(self.manifest)


def parse_manifest(manifest: str) -> list[dict[str, Any]]:
    """The Kubernetes objects of a multi-document YAML manifest (empty documents dropped)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(manifest, Loader=loader) if doc]


def lint(chart: Path, values: Mapping[str, Any] | None = None) -> LintResult:
    """`helm lint --strict` of the chart with `values` (none: the chart's own values.yaml)."""
    with _helm_home() as home:
        args = ["lint", "--strict", str(chart), *_values_args(home, values)]
        done = _run(args, home)
    output = done.stdout + done.stderr
    return LintResult(done.returncode == 0, parse_lint(output), output)


def parse_lint(output: str) -> list[LintMessage]:
    """The `[SEVERITY] path: message` entries of helm lint's output.

    A message goes on over the following lines (schema errors list one violation a line) up to
    a blank line or the next entry.
    """
    messages: list[LintMessage] = []
    current: list[str] | None = None
    for line in output.splitlines():
        if match := _LINT_LINE.match(line):
            current = [match[1], match[2], match[3]]
            messages.append(LintMessage(*current))
        elif current is not None and line.strip():
            current[2] += "\n" + line
            messages[-1] = LintMessage(*current)
        else:
            current = None
    return messages


def template(
    chart: Path,
    values: Mapping[str, Any] | None = None,
    namespace: str = "nest",
    kube_version: str | None = None,
    *,
    release: str = "nest",
) -> list[dict[str, Any]]:
    """The objects `helm template` renders (`kube_version`: `.Capabilities.KubeVersion`).

    Raises RenderError with helm's message when the chart does not render, e.g. when
    values.schema.json refuses `values`.
    """
    with _helm_home() as home:
        args = ["template", release, str(chart), "--namespace", namespace]
        if kube_version:
            args += ["--kube-version", kube_version]
        done = _run([*args, *_values_args(home, values)], home)
    if done.returncode != 0:
        raise RenderError(args, done.stderr)
    return parse_manifest(done.stdout)


def notes(
    chart: Path,
    values: Mapping[str, Any] | None = None,
    namespace: str = "nest",
    *,
    release: str = "nest",
) -> str:
    """The rendered NOTES.txt, which `helm template` leaves out.

    From `helm install --dry-run=client`, which renders the release without reaching a cluster.
    """
    with _helm_home() as home:
        args = ["install", release, str(chart), "--namespace", namespace, "--dry-run=client"]
        done = _run([*args, "--output", "json", *_values_args(home, values)], home)
    if done.returncode != 0:
        raise RenderError(args, done.stderr)
    return str((json.loads(done.stdout).get("info") or {}).get("notes", ""))


def install(
    chart: Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str,
    namespace: str,
    kubeconfig: Path,
    wait: bool = False,
    timeout: float = 300.0,
) -> Release:
    """`helm install` into the cluster of `kubeconfig` (creating `namespace` if need be).

    With `wait`, helm waits (its `watcher` strategy) until the release's resources are ready,
    up to `timeout` seconds. Raises ReleaseFailed with helm's stderr.
    """
    with _helm_home() as home:
        args = [
            "install",
            release,
            str(chart),
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            namespace,
            "--create-namespace",
            "--timeout",
            f"{timeout:.0f}s",
            "--output",
            "json",
        ]
        if wait:
            args.append("--wait=watcher")
        done = _run([*args, *_values_args(home, values)], home, timeout=timeout + 60)
    if done.returncode != 0:
        raise ReleaseFailed(args, done.stderr)
    answer = json.loads(done.stdout)
    info = answer.get("info") or {}
    return Release(
        name=answer["name"],
        namespace=answer.get("namespace", namespace),
        revision=int(answer.get("version", 1)),
        status=str(info.get("status", "")),
        manifest=answer.get("manifest", ""),
        notes=info.get("notes", ""),
    )


def uninstall(
    release: str,
    *,
    namespace: str,
    kubeconfig: Path,
    wait: bool = False,
    timeout: float = 300.0,
) -> None:
    """`helm uninstall` of `release`; with `wait`, until its resources are gone."""
    with _helm_home() as home:
        args = [
            "uninstall",
            release,
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            namespace,
            "--timeout",
            f"{timeout:.0f}s",
        ]
        if wait:
            args.append("--wait")
        done = _run(args, home, timeout=timeout + 60)
    if done.returncode != 0:
        raise ReleaseFailed(args, done.stderr)


def version() -> str:
    """`helm version --short` of the binary the tests use (e.g. `v4.3.2+g...` or `v4.3.2`)."""
    with _helm_home() as home:
        done = _run(["version", "--short"], home)
    if done.returncode != 0:
        raise HelmError(["version", "--short"], done.stderr)
    return done.stdout.strip()


@contextlib.contextmanager
def _helm_home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nest-helm-") as home:
        yield Path(home)


def _values_args(home: Path, values: Mapping[str, Any] | None) -> list[str]:
    if values is None:
        return []
    path = home / "values.json"  # JSON is YAML
    path.write_text(json.dumps(values))
    return ["--values", str(path)]


def _run(
    args: Sequence[str], home: Path, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_") and k != "KUBECONFIG"}
    env |= {
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        # Nothing here may reach a cluster by accident: kubeconfigs are only passed explicitly.
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }
    return subprocess.run(
        [str(binaries.helm()), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
