"""What the harness can run for a container image: the binaries of that image's version.

A real kubelet pulls an image; the harness maps the images a hosted control plane uses to the
binaries built from Go modules for the same version (`tests.support.kube.binaries`), placed
where the image has them, and the Nest image to this checkout's own interpreter. Any other
image cannot run here: its container waits with reason `ImageNotRunnable`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.kube import binaries

REPOSITORY = Path(__file__).resolve().parents[3]

_KUBERNETES = re.compile(
    r"(?:^|/)(kube-apiserver|kube-controller-manager|kube-scheduler|kubectl):v(\d+\.\d+\.\d+)$"
)
_ETCD = re.compile(r"(?:^|/)etcd:v?(\d+\.\d+\.\d+)(?:-\d+)?$")
_KONNECTIVITY = re.compile(r"(?:^|/)kas-network-proxy/proxy-server:v(\d+\.\d+\.\d+)$")
_NEST = re.compile(r"(?:^|/)nest(?:/nest)?(?::[^/]+)?$")

NEST_ETCD_VERSION = binaries.ETCD_VERSIONS[0]
"""The etcdutl the Nest image ships (deploy/Dockerfile copies it from the newest etcd image)."""


class ImageNotRunnable(Exception):
    """The harness has no binaries for this image."""


@dataclass(frozen=True)
class ImagePlan:
    """How to run a container of one image."""

    files: dict[str, Path] = field(default_factory=dict)
    """Path inside the container -> host file bind-mounted there (the image's binaries)."""
    path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    """PATH of the image."""
    workdir: str = "/"


def plan(image: str) -> ImagePlan:
    """The plan for `image`; builds the binaries on first use (minutes, cold). Blocking."""
    try:
        return _plan(image)
    except binaries.BuildFailed as exc:
        raise ImageNotRunnable(f"no binaries for {image}: {exc}") from exc


def _plan(image: str) -> ImagePlan:
    if match := _KUBERNETES.search(image):
        component, version = match.groups()
        built = binaries.kubernetes(version)
        path = {
            "kube-apiserver": built.kube_apiserver,
            "kube-controller-manager": built.kube_controller_manager,
            "kube-scheduler": built.kube_scheduler,
            "kubectl": built.kubectl,
        }[component]
        return ImagePlan(files={f"/usr/local/bin/{component}": path})
    if match := _ETCD.search(image):
        etcd = binaries.etcd(match.group(1))
        return ImagePlan(
            files={
                "/usr/local/bin/etcd": etcd.etcd,
                "/usr/local/bin/etcdctl": etcd.etcdctl,
                "/usr/local/bin/etcdutl": etcd.etcdutl,
            }
        )
    if match := _KONNECTIVITY.search(image):
        server = binaries.konnectivity_server(match.group(1))
        return ImagePlan(files={"/proxy-server": server, "/usr/local/bin/proxy-server": server})
    if _NEST.search(image.split("@", maxsplit=1)[0]):
        etcd = binaries.etcd(NEST_ETCD_VERSION)
        venv_bin = Path(sys.executable).parent
        return ImagePlan(
            files={"/usr/local/bin/etcdutl": etcd.etcdutl},
            path=f"/usr/local/sbin:/usr/local/bin:{venv_bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            workdir=str(REPOSITORY),
        )
    raise ImageNotRunnable(f"the harness has no binaries for image {image}")
