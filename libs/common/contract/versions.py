"""The Kubernetes versions Nest can host, and the component images each one runs.

One table shared by the API (which refuses versions it does not know and illegal upgrade
steps) and the provisioner (which renders images from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering


@total_ordering
@dataclass(frozen=True)
class Version:
    """A Kubernetes release version, `major.minor.patch`."""

    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse `1.34.1` or `v1.34.1`; raise ValueError on anything else."""
        parts = text.removeprefix("v").split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{text!r} is not a version of the form 1.34.1")
        major, minor, patch = (int(p) for p in parts)
        return cls(major, minor, patch)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return (self.major, self.minor, self.patch) < (other.major, other.minor, other.patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class Release:
    """What one supported Kubernetes version runs: the component image tags.

    etcd and CoreDNS are kubeadm's own (`DefaultEtcdVersion` and `CoreDNSVersion` in
    k8s.io/kubernetes `cmd/kubeadm/app/constants/constants.go` of that version); konnectivity
    is the proxy-server of the version's `cluster/gce/manifests/konnectivity-server.yaml`.
    """

    version: Version
    etcd: str
    coredns: str
    konnectivity: str


SUPPORTED_RELEASES: tuple[Release, ...] = (
    Release(Version(1, 33, 5), etcd="3.5.21-0", coredns="v1.12.0", konnectivity="v0.33.0"),
    Release(Version(1, 34, 1), etcd="3.6.4-0", coredns="v1.12.1", konnectivity="v0.34.0"),
    Release(Version(1, 34, 2), etcd="3.6.5-0", coredns="v1.12.1", konnectivity="v0.34.0"),
    Release(Version(1, 35, 0), etcd="3.6.6-0", coredns="v1.13.1", konnectivity="v0.34.0"),
    # 1.35.4's own GCE manifest still names konnectivity v0.31.2; keep 1.35.0's v0.34.0 so a
    # patch upgrade within 1.35 never downgrades the konnectivity server.
    Release(Version(1, 35, 4), etcd="3.6.6-0", coredns="v1.13.1", konnectivity="v0.34.0"),
    Release(Version(1, 36, 3), etcd="3.6.8-0", coredns="v1.14.2", konnectivity="v0.34.0"),
    Release(Version(1, 37, 2), etcd="3.7.0-0", coredns="v1.14.6", konnectivity="v0.36.0"),
)

SUPPORTED_VERSIONS: tuple[str, ...] = tuple(str(r.version) for r in SUPPORTED_RELEASES)
NEWEST_VERSION: str = str(max(r.version for r in SUPPORTED_RELEASES))


def release(version: str) -> Release:
    """The release entry for a supported version; KeyError if it is not supported."""
    wanted = Version.parse(version)
    for entry in SUPPORTED_RELEASES:
        if entry.version == wanted:
            return entry
    raise KeyError(version)


class UpgradeRefused(ValueError):
    """A version change that Kubernetes' version-skew policy does not allow."""


def check_upgrade(current: str, target: str) -> None:
    """Refuse downgrades and minor skips; any patch within a minor, or +1 minor, is allowed."""
    old, new = Version.parse(current), Version.parse(target)
    if new == old:
        return
    if new < old:
        raise UpgradeRefused(f"downgrade from {old} to {new} is not supported")
    if new.major != old.major or new.minor > old.minor + 1:
        raise UpgradeRefused(
            f"upgrade from {old} to {new} skips a minor version; "
            f"upgrade to {old.major}.{old.minor + 1}.x first"
        )
