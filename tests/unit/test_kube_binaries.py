"""The pure parts of tests.support.kube.binaries: reading upstream go.mod files, rendering the
generated ones, and the version stamps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.kube import binaries

# The shape of k8s.io/kubernetes's own go.mod (v1.37.2, shortened).
UPSTREAM = """\
// This is a generated file. Do not edit directly.

module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
\tgithub.com/spf13/cobra v1.10.1
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0 // indirect
\tk8s.io/sample-apiserver v0.0.0
)

require k8s.io/klog/v2 v2.130.1

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/sample-apiserver => ./staging/src/k8s.io/sample-apiserver
\tk8s.io/sample-cli-plugin => ./staging/src/k8s.io/sample-cli-plugin
\tgithub.com/example/fork => github.com/example/fork v1.2.3
)

replace k8s.io/streaming => ./staging/src/k8s.io/streaming
"""


def test_upstream_go_mod_is_read() -> None:
    parsed = binaries.parse_go_mod(UPSTREAM)
    assert parsed.module == "k8s.io/kubernetes"
    assert parsed.go == "1.26.0"
    assert parsed.godebug == ("default=go1.26",)
    assert parsed.requires == {
        "github.com/spf13/cobra": "v1.10.1",
        "k8s.io/api": "v0.0.0",
        "k8s.io/client-go": "v0.0.0",
        "k8s.io/sample-apiserver": "v0.0.0",
        "k8s.io/klog/v2": "v2.130.1",
    }
    assert parsed.replaces["k8s.io/streaming"] == "./staging/src/k8s.io/streaming"
    assert parsed.replaces["github.com/example/fork"] == "github.com/example/fork v1.2.3"
    assert binaries.local_replacements(parsed) == [
        "k8s.io/api",
        "k8s.io/client-go",
        "k8s.io/sample-apiserver",
        "k8s.io/sample-cli-plugin",
        "k8s.io/streaming",
    ]


def test_kubernetes_go_mod_pins_every_served_staging_module() -> None:
    text = binaries.render_kubernetes_go_mod(
        UPSTREAM, "1.37.2", unserved={"k8s.io/sample-cli-plugin"}
    )
    rendered = binaries.parse_go_mod(text)
    assert rendered.module == "nest.local/kubebuild"
    assert rendered.go == binaries.GO_LINE == "1.26.0"
    assert rendered.godebug == ("default=go1.26",)
    assert rendered.requires == {"k8s.io/kubernetes": "v1.37.2"}
    assert rendered.replaces == {
        "k8s.io/api": "k8s.io/api v0.37.2",
        "k8s.io/client-go": "k8s.io/client-go v0.37.2",
        "k8s.io/sample-apiserver": "k8s.io/sample-apiserver v0.37.2",
        "k8s.io/streaming": "k8s.io/streaming v0.37.2",
    }
    assert "\tk8s.io/api => k8s.io/api v0.37.2\n" in text


def test_kubernetes_go_mod_accepts_a_leading_v_and_older_minors() -> None:
    text = binaries.render_kubernetes_go_mod(UPSTREAM, "v1.36.3")
    assert "require (\n\tk8s.io/kubernetes v1.36.3\n)" in text
    assert "\tk8s.io/sample-cli-plugin => k8s.io/sample-cli-plugin v0.36.3\n" in text


@pytest.mark.parametrize("version", ["1.37", "v1", "latest", "2.0.0", "1.37.2 "])
def test_kubernetes_go_mod_refuses_what_is_not_a_1x_release(version: str) -> None:
    with pytest.raises(ValueError, match=r"not a release version|only 1\.x releases"):
        binaries.render_kubernetes_go_mod(UPSTREAM, version)


def test_staging_modules_share_the_release_minor_and_patch() -> None:
    assert binaries.staging_version("1.37.2") == "v0.37.2"
    assert binaries.staging_version("1.38.0-rc.1") == "v0.38.0-rc.1"


def test_godebug_defaults_follow_upstreams_go_line_when_it_sets_none() -> None:
    etcd = binaries.parse_go_mod("module go.etcd.io/etcd/server/v3\n\ngo 1.24.0\n")
    assert binaries.upstream_godebug(etcd) == ("default=go1.24",)
    text = binaries.render_go_mod(
        "nest.local/etcdbuild",
        {"go.etcd.io/etcd/server/v3": "v3.6.8"},
        godebug=binaries.upstream_godebug(etcd),
    )
    assert text == (
        "module nest.local/etcdbuild\n\ngo 1.26.0\n\ngodebug default=go1.24\n\n"
        "require (\n\tgo.etcd.io/etcd/server/v3 v3.6.8\n)\n"
    )


def test_kubernetes_version_stamps_match_a_release_build() -> None:
    flags = binaries.kubernetes_ldflags("1.37.2", "2026-10-27T12:01:04Z")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.37.2" in flags
        assert f"-X {package}.gitMajor=1" in flags
        assert f"-X {package}.gitMinor=37" in flags
        assert f"-X {package}.gitTreeState=clean" in flags
        assert f"-X {package}.buildDate=2026-10-27T12:01:04Z" in flags


def test_binary_names_drop_a_major_version_suffix() -> None:
    assert binaries._go_exec_name("go.etcd.io/etcd/server/v3") == "server"
    assert binaries._go_exec_name("k8s.io/kubernetes/cmd/kube-apiserver") == "kube-apiserver"
    assert binaries._go_exec_name("helm.sh/helm/v4/cmd/helm") == "helm"


def test_cache_is_outside_the_repository() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert not binaries.CACHE_ROOT.resolve().is_relative_to(repo)
