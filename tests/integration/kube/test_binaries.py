"""The Kubernetes, etcd, konnectivity and Helm binaries built from Go modules
(`tests.support.kube.binaries`): each builds (or is found cached) and reports its version.

A cold build takes minutes (Kubernetes about five per version on two cores); afterwards these
tests only run the binaries.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.kube import binaries
from tests.support.parts import missing

pytestmark = pytest.mark.timeout(3600)


def need(component: str, version: str) -> None:
    """Skip (or fail under NEST_REQUIRE_ALL=1) when the build is not cached and Go is missing."""
    if not binaries.is_built(component, version) and not binaries.go_available():
        missing(
            f"go is not installed, and {component} {version} is not built in "
            f"{binaries.CACHE_ROOT} (scripts/kube-binaries builds it)"
        )


def run(*args: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout + done.stderr


@pytest.mark.parametrize("version", binaries.KUBERNETES_VERSIONS)
def test_kubernetes_binaries_report_their_release(version: str) -> None:
    need("kubernetes", version)
    k = binaries.kubernetes(version)
    assert k.version == version
    for server in (k.kube_apiserver, k.kube_controller_manager, k.kube_scheduler):
        assert server.is_absolute()
        assert run(server, "--version").strip() == f"Kubernetes v{version}", server.name
    client = json.loads(run(k.kubectl, "version", "--client", "--output", "json"))
    major, minor = version.split(".")[:2]
    assert client["clientVersion"]["gitVersion"] == f"v{version}"
    assert (client["clientVersion"]["major"], client["clientVersion"]["minor"]) == (major, minor)
    assert client["clientVersion"]["gitTreeState"] == "clean"


@pytest.mark.parametrize("version", binaries.ETCD_VERSIONS)
def test_etcd_binaries_report_their_release(version: str) -> None:
    need("etcd", version)
    e = binaries.etcd(version)
    assert e.version == version
    assert f"etcd Version: {version}\n" in run(e.etcd, "--version")
    assert f"etcdutl version: {version}\n" in run(e.etcdutl, "version")
    assert f"etcdctl version: {version}\n" in run(e.etcdctl, "version")


@pytest.mark.parametrize("version", binaries.KONNECTIVITY_VERSIONS)
def test_konnectivity_server_runs(version: str) -> None:
    need("konnectivity", version)
    server = binaries.konnectivity_server(version)
    assert server.name == "proxy-server"
    usage = run(server, "--help")
    assert "--cluster-cert" in usage
    assert "--agent-port" in usage


def test_helm_reports_its_release() -> None:
    need("helm", binaries.HELM_VERSION)
    helm = binaries.helm()
    assert run(helm, "version", "--template", "{{.Version}}").strip() == "v4.3.2"
    assert 'GitTreeState:"clean"' in run(helm, "version")


def test_a_cached_build_is_reused_untouched() -> None:
    need("helm", binaries.HELM_VERSION)
    first = binaries.helm()
    before = first.stat().st_mtime_ns
    assert binaries.helm() == first
    assert first.stat().st_mtime_ns == before
    assert binaries.is_built("helm", "v" + binaries.HELM_VERSION)


def test_a_version_the_proxy_refuses_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not binaries.go_available():
        missing("go is not installed")
    monkeypatch.setattr(binaries, "CACHE_ROOT", tmp_path)
    # Listed by some tools, but the module proxy answers 403 for it.
    with pytest.raises(binaries.BuildFailed, match=r"k8s\.io/kubernetes@v1\.36\.6 is not served"):
        binaries.kubernetes("1.36.6")
    assert not (tmp_path / "kubernetes" / "1.36.6").exists()
