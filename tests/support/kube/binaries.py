"""Real Kubernetes, etcd, konnectivity and Helm binaries for the tests, built from Go modules.

Nothing here is downloaded as a release binary: each component is built by `go build` from its
published Go module (through the Go module proxy), once per machine, and cached outside the
repository under `CACHE_ROOT/<component>/<version>/`. The generated main module of each build
stays under `CACHE_ROOT/src/<component>-<version>/` (its go.mod, go.sum and build.log), so a
build can be reproduced or inspected by hand.

A build holds an flock on `CACHE_ROOT/<component>-<version>.lock`, so parallel pytest-xdist
workers and developers wait for one build instead of racing it; a stamp file written last (and
atomically) marks a finished build, so an interrupted one is redone, never half used. A cached
component costs one stat per binary and prints nothing.

Kubernetes is built as a dependency: its own go.mod replaces every staging module
(`k8s.io/api`, `k8s.io/client-go`, ...) with `./staging/src/k8s.io/<name>`, which means nothing
outside its repository, so the generated go.mod pins each of them to the published
`k8s.io/<name> v0.<minor>.<patch>` with a `replace` line of its own.

`scripts/kube-binaries` (this module's `main`) builds everything ahead of a test run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("NEST_KUBE_CACHE") or Path.home() / ".cache" / "nest" / "kube")
"""Where built binaries live: `$NEST_KUBE_CACHE`, else `~/.cache/nest/kube` (never the repo)."""

KUBERNETES_VERSIONS = ("1.37.2", "1.36.3")
"""The newest served Kubernetes release, and the newest served one of the minor before."""

ETCD_VERSIONS = ("3.7.0", "3.6.8")
"""kubeadm's etcd for the Kubernetes versions above (3.7.0-0 for 1.37, 3.6.8-0 for 1.36)."""

KONNECTIVITY_VERSIONS = ("0.36.0", "0.34.0")
"""registry.k8s.io/kas-network-proxy/proxy-server tags for the Kubernetes versions above."""

HELM_VERSION = "4.3.2"

RECIPE = 1
"""Bumped whenever a build recipe changes, so that builds cached by an older recipe are redone."""

GO_LINE = "1.26.0"
"""The `go` line of every generated go.mod (`go build -mod=mod` raises it if a dependency asks)."""

STAMP = ".nest-built"

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?$")
_NOT_SERVED = ("403 Forbidden", "404 Not Found", "410 Gone", "not available", "unknown revision")


class BuildFailed(Exception):
    """A component could not be built: the message names the module@version and what go said."""


@dataclass(frozen=True)
class KubernetesBinaries:
    version: str
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path


@dataclass(frozen=True)
class EtcdBinaries:
    version: str
    etcd: Path
    etcdutl: Path
    etcdctl: Path


# go.mod: parsing what upstream declares, rendering the generated main module (pure)


@dataclass(frozen=True)
class GoMod:
    """The parts of a go.mod file a build needs."""

    module: str = ""
    go: str = ""
    requires: dict[str, str] = field(default_factory=dict)
    """module path -> version"""
    replaces: dict[str, str] = field(default_factory=dict)
    """module path (any version) -> target: a local path (`./x`, `../x`) or `module version`"""
    godebug: tuple[str, ...] = ()
    """`key=value` settings; only the main module's apply to a binary"""


def _strip_comment(line: str) -> str:
    return line.split("//", 1)[0].strip()


def parse_go_mod(text: str) -> GoMod:
    """The module, go line, requires, replaces and godebug settings of a go.mod file."""
    module, go = "", ""
    requires: dict[str, str] = {}
    replaces: dict[str, str] = {}
    godebug: list[str] = []
    block: str | None = None
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if not line:
            continue
        if block is not None:
            if line == ")":
                block = None
                continue
            verb, rest = block, line
        else:
            verb, _, rest = line.partition(" ")
            rest = rest.strip()
            if rest == "(":
                block = verb
                continue
        if verb == "module":
            module = rest.strip('"')
        elif verb == "go":
            go = rest
        elif verb == "require":
            path, version = rest.split()[:2]
            requires[path] = version
        elif verb == "replace":
            old, _, new = rest.partition("=>")
            replaces[old.split()[0]] = " ".join(new.split())
        elif verb == "godebug":
            godebug.append("".join(rest.split()))
    return GoMod(module, go, requires, replaces, tuple(godebug))


def local_replacements(upstream: GoMod) -> list[str]:
    """Modules the upstream go.mod replaces with a directory of its own repository."""
    return [
        path
        for path, target in upstream.replaces.items()
        if target.startswith(("./", "../")) and " " not in target
    ]


def upstream_godebug(upstream: GoMod) -> tuple[str, ...]:
    """The godebug settings upstream's own builds run with, for the generated main module.

    Only a main module's `godebug` lines and `go` line set a binary's GODEBUG defaults, and the
    generated module's `go` line is newer than many upstreams', so their defaults are kept
    explicitly: upstream's own godebug lines, else `default=go1.N` of its `go` line.
    """
    if upstream.godebug:
        return upstream.godebug
    if match := re.match(r"^1\.(\d+)", upstream.go):
        return (f"default=go1.{match.group(1)}",)
    return ()


def render_go_mod(
    module: str,
    requires: Mapping[str, str],
    replaces: Mapping[str, str] | None = None,
    godebug: Sequence[str] = (),
) -> str:
    """A go.mod for a generated main module (`replaces`: module -> `module version`)."""
    lines = [f"module {module}", "", f"go {GO_LINE}", ""]
    if godebug:
        lines += [*(f"godebug {setting}" for setting in godebug), ""]
    lines += ["require (", *(f"\t{path} {version}" for path, version in requires.items()), ")"]
    if replaces:
        lines += ["", "replace ("]
        lines += [f"\t{path} => {target}" for path, target in sorted(replaces.items())]
        lines += [")"]
    return "\n".join(lines) + "\n"


def staging_version(version: str) -> str:
    """The staging modules' version of a Kubernetes release: 1.37.2 -> v0.37.2."""
    major, rest = _check_version(version).split(".", 1)
    if major != "1":
        raise ValueError(f"Kubernetes {version}: only 1.x releases have v0.x staging modules")
    return f"v0.{rest}"


def render_kubernetes_go_mod(
    upstream_go_mod: str, version: str, *, unserved: Collection[str] = ()
) -> str:
    """The go.mod that builds k8s.io/kubernetes vX.Y.Z as a dependency.

    Every staging module upstream replaces with `./staging/src/k8s.io/<name>` is pinned to the
    published `k8s.io/<name> v0.Y.Z`, except the `unserved` ones (the proxy does not have them
    at that version, e.g. k8s.io/sample-cli-plugin, which nothing requires).
    """
    upstream = parse_go_mod(upstream_go_mod)
    pinned = staging_version(version)
    replaces = {
        path: f"{path} {pinned}"
        for path in local_replacements(upstream)
        if upstream.replaces[path] == f"./staging/src/{path}" and path not in unserved
    }
    return render_go_mod(
        "nest.local/kubebuild",
        {"k8s.io/kubernetes": f"v{_check_version(version)}"},
        replaces,
        upstream_godebug(upstream),
    )


def kubernetes_ldflags(version: str, build_date: str) -> list[str]:
    """What kube's hack/lib/version.sh stamps into a release build (no git checkout here)."""
    major, minor = _check_version(version).split(".")[:2]
    values = {
        "gitVersion": f"v{version}",
        "gitMajor": major,
        "gitMinor": minor,
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": build_date,
    }
    return [
        f"-X {package}.{key}={value}"
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in values.items()
    ]


def _check_version(version: str) -> str:
    """`version` without a leading v, or ValueError when it is not X.Y.Z[-pre]."""
    bare = version.removeprefix("v")
    if not _VERSION.match(bare):
        raise ValueError(f"not a release version (X.Y.Z): {version!r}")
    return bare


# Recipes: what each component builds


@dataclass(frozen=True)
class _Upstream:
    """The published module a build starts from, as the module proxy describes it."""

    module: str
    version: str
    """with the v"""
    go_mod: GoMod
    go_mod_text: str
    time: str
    """publication time (RFC 3339): the build date, so rebuilds are reproducible"""


@dataclass(frozen=True)
class _Recipe:
    component: str
    module: str
    """the module whose version is the component's version"""
    binaries: Mapping[str, str]
    """main package -> binary name in the cache"""
    render: Callable[[_Upstream, Collection[str]], str]
    """upstream, unserved replacement modules -> the generated go.mod"""
    ldflags: Callable[[_Upstream], list[str]]
    tags: tuple[str, ...] = ()
    pinned_replacement: Callable[[str], str] | None = None
    """version -> the version each of upstream's local replacements is pinned to (None: none)"""


def _kubernetes_go_mod(upstream: _Upstream, unserved: Collection[str]) -> str:
    return render_kubernetes_go_mod(upstream.go_mod_text, upstream.version, unserved=unserved)


def _kubernetes_ldflags(upstream: _Upstream) -> list[str]:
    return kubernetes_ldflags(upstream.version.removeprefix("v"), upstream.time)


def _etcd_go_mod(upstream: _Upstream, unserved: Collection[str]) -> str:
    # etcd's server module has its main package at the root; etcdutl and etcdctl are modules of
    # the same release whose roots are main packages too.
    return render_go_mod(
        "nest.local/etcdbuild",
        dict.fromkeys(ETCD.binaries, upstream.version),
        godebug=upstream_godebug(upstream.go_mod),
    )


def _konnectivity_go_mod(upstream: _Upstream, unserved: Collection[str]) -> str:
    # Upstream replaces its konnectivity-client module with ./konnectivity-client: the same
    # release's published client module is that directory.
    replaces = {
        path: f"{path} {upstream.version}"
        for path in local_replacements(upstream.go_mod)
        if path not in unserved
    }
    return render_go_mod(
        "nest.local/konnectivitybuild",
        {upstream.module: upstream.version},
        replaces,
        upstream_godebug(upstream.go_mod),
    )


def _helm_go_mod(upstream: _Upstream, unserved: Collection[str]) -> str:
    return render_go_mod(
        "nest.local/helmbuild",
        {upstream.module: upstream.version},
        godebug=upstream_godebug(upstream.go_mod),
    )


def _helm_ldflags(upstream: _Upstream) -> list[str]:
    # What Helm's Makefile sets for a tagged release (metadata stays empty: not "unreleased").
    return [
        f"-X helm.sh/helm/v4/internal/version.version={upstream.version}",
        "-X helm.sh/helm/v4/internal/version.gitTreeState=clean",
    ]


KUBERNETES = _Recipe(
    component="kubernetes",
    module="k8s.io/kubernetes",
    binaries={
        f"k8s.io/kubernetes/cmd/{name}": name
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
    },
    render=_kubernetes_go_mod,
    ldflags=_kubernetes_ldflags,
    # The tags of kube's own non-debug builds (hack/lib/golang.sh).
    tags=("selinux", "notest", "grpcnotrace"),
    pinned_replacement=staging_version,
)
ETCD = _Recipe(
    component="etcd",
    module="go.etcd.io/etcd/server/v3",
    binaries={
        "go.etcd.io/etcd/server/v3": "etcd",
        "go.etcd.io/etcd/etcdutl/v3": "etcdutl",
        "go.etcd.io/etcd/etcdctl/v3": "etcdctl",
    },
    render=_etcd_go_mod,
    ldflags=lambda upstream: [],  # etcd's version is a constant of go.etcd.io/etcd/api/v3
)
KONNECTIVITY = _Recipe(
    component="konnectivity",
    module="sigs.k8s.io/apiserver-network-proxy",
    binaries={"sigs.k8s.io/apiserver-network-proxy/cmd/server": "proxy-server"},
    render=_konnectivity_go_mod,
    ldflags=lambda upstream: [],
    pinned_replacement=lambda version: f"v{version}",
)
HELM = _Recipe(
    component="helm",
    module="helm.sh/helm/v4",
    binaries={"helm.sh/helm/v4/cmd/helm": "helm"},
    render=_helm_go_mod,
    ldflags=_helm_ldflags,
)
RECIPES = {recipe.component: recipe for recipe in (KUBERNETES, ETCD, KONNECTIVITY, HELM)}
DEFAULT_VERSIONS: dict[str, tuple[str, ...]] = {
    "kubernetes": KUBERNETES_VERSIONS,
    "etcd": ETCD_VERSIONS,
    "konnectivity": KONNECTIVITY_VERSIONS,
    "helm": (HELM_VERSION,),
}


# The public entry points


def kubernetes(version: str) -> KubernetesBinaries:
    """kube-apiserver, kube-controller-manager, kube-scheduler and kubectl of `version`."""
    version = _check_version(version)
    built = _built(KUBERNETES, version)
    return KubernetesBinaries(
        version,
        kube_apiserver=built / "kube-apiserver",
        kube_controller_manager=built / "kube-controller-manager",
        kube_scheduler=built / "kube-scheduler",
        kubectl=built / "kubectl",
    )


def etcd(version: str) -> EtcdBinaries:
    """etcd, etcdutl and etcdctl of `version`."""
    version = _check_version(version)
    built = _built(ETCD, version)
    return EtcdBinaries(version, built / "etcd", built / "etcdutl", built / "etcdctl")


def konnectivity_server(version: str) -> Path:
    """The konnectivity server (`proxy-server`) of apiserver-network-proxy `version`."""
    return _built(KONNECTIVITY, _check_version(version)) / "proxy-server"


def helm(version: str = HELM_VERSION) -> Path:
    """The `helm` CLI of `version`."""
    return _built(HELM, _check_version(version)) / "helm"


@functools.cache
def go_available() -> bool:
    """Whether `go version` works here (a cached build needs no Go, a new one does)."""
    try:
        done = subprocess.run(["go", "version"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def is_built(component: str, version: str) -> bool:
    """Whether `component` `version` is in the cache (so asking for it builds nothing)."""
    return _is_built(RECIPES[component], _check_version(version))


# Building


def _version_dir(recipe: _Recipe, version: str) -> Path:
    return CACHE_ROOT / recipe.component / version


def _is_built(recipe: _Recipe, version: str) -> bool:
    target = _version_dir(recipe, version)
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == RECIPE and all(
        (target / name).is_file() for name in recipe.binaries.values()
    )


def _built(recipe: _Recipe, version: str) -> Path:
    """The cache directory holding `recipe`'s binaries of `version`, built if need be."""
    if _is_built(recipe, version):
        return _version_dir(recipe, version)
    with _locked(CACHE_ROOT / f"{recipe.component}-{version}.lock", recipe, version):
        if not _is_built(recipe, version):  # another process may have built it meanwhile
            _build(recipe, version)
    return _version_dir(recipe, version)


@contextlib.contextmanager
def _locked(path: Path, recipe: _Recipe, version: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another build of {recipe.component} v{version} ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _go_env() -> dict[str, str]:
    return os.environ | {
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=mod -buildvcs=false",
        "CGO_ENABLED": "0",
        "GOWORK": "off",
    }


def _go(args: Sequence[str], cwd: Path, timeout: float | None = None) -> tuple[int, str]:
    """Run `go args` in `cwd`: its exit status and its stdout+stderr."""
    try:
        done = subprocess.run(
            ["go", *args],
            cwd=cwd,
            env=_go_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise BuildFailed("go is not installed (no `go` on PATH)") from None
    except subprocess.TimeoutExpired as exc:
        raise BuildFailed(f"go {' '.join(args[:2])} gave no answer in {timeout:.0f}s") from exc
    return done.returncode, done.stdout


def _tail(output: str, lines: int = 20) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def _look_up(src: Path, modules: Sequence[str]) -> list[dict[str, object]]:
    """`go list -m -json -e` of `module@version`s: each one's facts, or its `Error`."""
    code, output = _go(["list", "-m", "-json", "-e", *modules], src, timeout=600)
    decoder, answers, at = json.JSONDecoder(), [], 0
    text = output.strip()
    try:
        while at < len(text):
            answer, at = decoder.raw_decode(text, at)
            answers.append(answer)
            while at < len(text) and text[at].isspace():
                at += 1
    except ValueError:
        answers = []
    if code != 0 or len(answers) != len(modules):
        raise BuildFailed(f"go list -m {' '.join(modules[:3])}...: {_tail(output)}")
    return answers


def _error_of(answer: Mapping[str, object]) -> str | None:
    error = answer.get("Error")
    if isinstance(error, dict):
        return str(error.get("Err", error))
    return None


def _upstream(recipe: _Recipe, version: str, src: Path) -> _Upstream:
    (answer,) = _look_up(src, [f"{recipe.module}@v{version}"])
    if error := _error_of(answer):
        served = "not served by the Go module proxy" if _refused(error) else "not available"
        raise BuildFailed(f"{recipe.module}@v{version} is {served}: {error}")
    text = Path(str(answer["GoMod"])).read_text()
    return _Upstream(recipe.module, f"v{version}", parse_go_mod(text), text, str(answer["Time"]))


def _refused(error: str) -> bool:
    return any(marker in error for marker in _NOT_SERVED)


def _unserved_replacements(recipe: _Recipe, upstream: _Upstream, src: Path) -> set[str]:
    """Upstream's local replacements whose pinned version the proxy does not serve.

    Those are left out of the generated go.mod; one the build would need (upstream requires it,
    at the placeholder v0.0.0 its local replacement stands for) fails the build here instead.
    """
    local = local_replacements(upstream.go_mod)
    if recipe.pinned_replacement is None or not local:
        return set()
    pinned = recipe.pinned_replacement(upstream.version.removeprefix("v"))
    answers = _look_up(src, [f"{path}@{pinned}" for path in local])
    unserved = set()
    for path, answer in zip(local, answers, strict=True):
        if error := _error_of(answer):
            if upstream.go_mod.requires.get(path) == "v0.0.0":
                raise BuildFailed(
                    f"{path}@{pinned}, which {recipe.module}@{upstream.version} needs, is not "
                    f"served by the Go module proxy: {error}"
                )
            unserved.add(path)
    return unserved


def _build(recipe: _Recipe, version: str) -> None:
    names = ", ".join(recipe.binaries.values())
    _say(f"building {recipe.component} v{version} ({names}) from {recipe.module}@v{version}")
    started = time.monotonic()
    src = CACHE_ROOT / "src" / f"{recipe.component}-{version}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / "go.mod").write_text(f"module nest.local/{recipe.component}build\n\ngo {GO_LINE}\n")
    try:
        upstream = _upstream(recipe, version, src)
        unserved = _unserved_replacements(recipe, upstream, src)
    except BuildFailed:
        shutil.rmtree(src, ignore_errors=True)
        raise
    (src / "go.mod").write_text(recipe.render(upstream, unserved))

    target = _version_dir(recipe, version)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    out = Path(tempfile.mkdtemp(prefix=".out-", dir=target))
    args = ["build", "-trimpath", "-o", f"{out}/"]
    if recipe.tags:
        args += ["-tags", ",".join(recipe.tags)]
    args += ["-ldflags", " ".join(["-s", "-w", *recipe.ldflags(upstream)]), *recipe.binaries]
    code, output = _go(args, src)
    (src / "build.log").write_text(f"go {' '.join(args)}\n{output}")
    if code != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise BuildFailed(
            f"go build of {recipe.module}@v{version} failed (log: {src / 'build.log'}):\n"
            + _tail(output)
        )
    for package, name in recipe.binaries.items():
        produced = out / _go_exec_name(package)
        if not produced.is_file():
            found = sorted(p.name for p in out.iterdir())
            raise BuildFailed(f"go build of {package}@v{version} made no {produced.name}: {found}")
        produced.replace(target / name)
    out.rmdir()
    seconds = time.monotonic() - started
    stamp = {
        "recipe": RECIPE,
        "component": recipe.component,
        "version": version,
        "module": f"{recipe.module}@v{version}",
        "binaries": sorted(recipe.binaries.values()),
        "seconds": round(seconds, 1),
    }
    partial = target / f"{STAMP}.partial"
    partial.write_text(json.dumps(stamp, indent=2) + "\n")
    partial.replace(target / STAMP)
    count = len(recipe.binaries)
    plural = "binary" if count == 1 else "binaries"
    _say(f"built {recipe.component} v{version} ({count} {plural}) in {_duration(seconds)}")


def _go_exec_name(package: str) -> str:
    """The file `go build -o dir/` names a main package: its last element, not a /vN suffix."""
    parent, _, last = package.rpartition("/")
    if re.fullmatch(r"v\d+", last) and parent:
        return parent.rpartition("/")[2]
    return last


# scripts/kube-binaries


def _paths(component: str, version: str) -> list[Path]:
    if component == "kubernetes":
        k = kubernetes(version)
        return [k.kube_apiserver, k.kube_controller_manager, k.kube_scheduler, k.kubectl]
    if component == "etcd":
        e = etcd(version)
        return [e.etcd, e.etcdutl, e.etcdctl]
    if component == "konnectivity":
        return [konnectivity_server(version)]
    return [helm(version)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/kube-binaries",
        description=(
            "Build (once; cached in $NEST_KUBE_CACHE, default ~/.cache/nest/kube) the "
            "Kubernetes, etcd, konnectivity and Helm binaries the tests use, from their Go "
            "modules, and print each binary's absolute path. Without arguments: every default "
            "version of every component."
        ),
    )
    parser.add_argument("component", nargs="?", choices=sorted(RECIPES), help="one component")
    parser.add_argument("version", nargs="*", help="its versions (default: the tests' versions)")
    parser.add_argument(
        "--print-only",
        action="store_true",
        help="build nothing: print the paths of what is cached, exit 1 if anything is missing",
    )
    args = parser.parse_args(argv)
    components = [args.component] if args.component else list(RECIPES)
    wanted = [
        (component, _check_version(version))
        for component in components
        for version in (args.version or DEFAULT_VERSIONS[component])
    ]
    status = 0
    for component, version in wanted:
        cached = _is_built(RECIPES[component], version)
        if args.print_only and not cached:
            _say(f"not built: {component} v{version}")
            status = 1
            continue
        if cached and not args.print_only:
            _say(f"cached {component} v{version}")
        try:
            paths = _paths(component, version)
        except BuildFailed as exc:
            _say(f"FAILED {component} v{version}: {exc}")
            status = 1
            continue
        for path in paths:
            print(path, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
