"""One management cluster per test session, shared by every pytest-xdist worker.

The controller process names the run (`NEST_KUBE_RUN`) and itself (`NEST_KUBE_PARENT`) in
`pytest_configure`, before workers start, so they inherit both. The first worker that needs the
cluster starts the harness in the background under a file lock; the others find it ready. The
harness stops by itself when the controller process is gone, and the controller stops it in
`pytest_unconfigure` (`stop_shared`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.kube import binaries, harness
from tests.support.kube.api import Api, Credentials

RUN_VARIABLE = "NEST_KUBE_RUN"
PARENT_VARIABLE = "NEST_KUBE_PARENT"
PROBE_SCALE = 0.25
"""Probe timings of the tests' cluster, relative to what pods declare (a startup probe's 10 s
initial delay becomes 2.5 s): the same logic, a quarter of the waiting."""


class Unavailable(Exception):
    """The harness cannot run on this machine (not root, no `ip`, no Go to build with)."""


@dataclass(frozen=True)
class ManagementCluster:
    """A running management cluster, as tests see it."""

    directory: Path
    kubeconfig: Path
    url: str
    version: str
    node_names: tuple[str, ...]
    node_ips: tuple[str, ...]
    hosts: Path
    """The cluster's DNS as a hosts file (service and pod names)."""
    etcd_url: str
    """The management cluster's own etcd (plain HTTP on 127.0.0.1)."""
    bridge: str
    """The harness bridge; a real pod's network namespace is `<bridge>-<first 10 hex of uid>`."""

    def api(self, **kwargs: object) -> Api:
        return Api(Credentials.from_kubeconfig(self.kubeconfig), **kwargs)  # type: ignore[arg-type]

    def resolve(self, name: str) -> str | None:
        """The address the cluster's DNS gives `name`, else None."""
        for line in self.hosts.read_text().splitlines():
            parts = line.split()
            if name in parts[1:]:
                return parts[0]
        return None


def configure_controller() -> None:
    """Called in the pytest controller (or the only process) before any worker starts."""
    os.environ.setdefault(RUN_VARIABLE, uuid.uuid4().hex[:10])
    os.environ.setdefault(PARENT_VARIABLE, str(os.getpid()))


def directory() -> Path:
    run = os.environ.get(RUN_VARIABLE) or f"solo-{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"nest-kube-{run}"


def check_machine() -> None:
    if os.geteuid() != 0:
        raise Unavailable("the Kubernetes harness needs root (network namespaces, mounts)")
    for tool in ("ip", "unshare", "setpriv", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise Unavailable(f"the Kubernetes harness needs `{tool}` (util-linux/iproute2)")
    if not binaries.go_available():
        raise Unavailable("no `go` to build the Kubernetes binaries with (scripts/kube-binaries)")


def shared_cluster() -> ManagementCluster:
    """The session's management cluster, started on first use (blocking)."""
    check_machine()
    where = directory()
    where.parent.mkdir(parents=True, exist_ok=True)
    with (where.parent / f"{where.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = harness.State.load(where)
        if state is None or not state.ready or not harness.alive(state.pid):
            parent = int(os.environ.get(PARENT_VARIABLE) or os.getpid())
            state = harness.start_background(
                where, probe_scale=PROBE_SCALE, parent=parent, echo=False
            )
    return ManagementCluster(
        directory=where,
        kubeconfig=Path(state.kubeconfig),
        url=state.url,
        version=state.version,
        node_names=tuple(state.node_names),
        node_ips=tuple(state.node_ips),
        hosts=Path(state.hosts),
        etcd_url=state.etcd_url,
        bridge=state.bridge,
    )


def stop_shared() -> None:
    """Stop this session's harness, if one was started (controller only)."""
    where = directory()
    if (where / harness.STATE).exists():
        harness.stop_background(where)
    if os.environ.get("NEST_KUBE_KEEP"):  # keep its logs (and pods' logs) for a post-mortem
        print(f"\nthe test cluster's files are kept in {where}")
        return
    shutil.rmtree(where, ignore_errors=True)
    (where.parent / f"{where.name}.lock").unlink(missing_ok=True)
