"""The cluster part of the event contract: the spec every consumer sees, its intents and events.

The API validates a cluster spec with these models and sends it whole inside a `reconcile`
intent, so the provisioner never calls back for it. Changes here must be additive only.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from libs.common.contract.base import WireModel
from libs.common.contract.versions import NEWEST_VERSION, SUPPORTED_VERSIONS

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def validate_name(name: str) -> str:
    """A cluster name is a DNS-1123 label: it names a namespace and DNS records."""
    if len(name) > 63:
        raise ValueError("must be at most 63 characters")
    if not DNS_LABEL.match(name):
        raise ValueError(
            "must be a DNS-1123 label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels follow Kubernetes' syntax, so they can be copied onto Kubernetes objects."""
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
            raise ValueError(f"label key {key!r}: prefix must be a DNS subdomain")
        if not name or len(name) > 63 or not LABEL_KEY_NAME.match(name):
            raise ValueError(
                f"label key {key!r}: name must be 1-63 alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric"
            )
        if len(value) > 63 or not LABEL_VALUE.match(value):
            raise ValueError(
                f"label {key!r}: value must be at most 63 alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric"
            )
    return labels


Labels = Annotated[dict[str, str], Field(default_factory=dict, max_length=64)]


class ControlPlaneSpec(WireModel):
    """The kube-apiserver, controller-manager and scheduler pods."""

    replicas: int = Field(default=2, ge=1, le=5, description="Control-plane pod replicas, 1-5.")


class DatastoreSpec(WireModel):
    """The cluster's etcd, run as a StatefulSet in the management cluster."""

    kind: Literal["etcd"] = Field(default="etcd", description="Datastore engine; only etcd.")
    replicas: Literal[1, 3] = Field(default=3, description="etcd members: 1 or 3.")
    storage_size: str = Field(default="10Gi", description="Volume size per member, e.g. 10Gi.")
    storage_class_name: str | None = Field(
        default=None, description="StorageClass for the etcd volumes; unset uses the default."
    )

    @field_validator("storage_size")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if not QUANTITY.match(value):
            raise ValueError("must be a Kubernetes quantity such as 10Gi or 512Mi")
        return value

    @field_validator("storage_class_name")
    @classmethod
    def _storage_class(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not DNS_SUBDOMAIN.match(value)):
            raise ValueError("must be a DNS subdomain (a StorageClass name)")
        return value


class NetworkSpec(WireModel):
    """How the control plane is reached and which address ranges the cluster uses."""

    service_type: Literal["LoadBalancer", "NodePort"] = Field(
        default="LoadBalancer", description="How the API endpoint is exposed."
    )
    pod_cidr: str = Field(default="10.244.0.0/16", description="Pod address range.")
    service_cidr: str = Field(default="10.96.0.0/12", description="Service address range.")
    dns_domain: str = Field(default="cluster.local", description="The cluster's DNS domain.")

    @field_validator("pod_cidr", "service_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid CIDR network ({exc})") from None
        if network.num_addresses < 256:
            raise ValueError(f"{value} is too small; use at least a /24 (IPv4) or /120 (IPv6)")
        return str(network)

    @field_validator("dns_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if len(value) > 253 or not DNS_SUBDOMAIN.match(value):
            raise ValueError("must be a DNS subdomain such as cluster.local")
        return value

    @model_validator(mode="after")
    def _disjoint(self) -> NetworkSpec:
        pods = ipaddress.ip_network(self.pod_cidr)
        services = ipaddress.ip_network(self.service_cidr)
        if pods.version == services.version and pods.overlaps(services):
            raise ValueError(
                f"podCidr {pods} and serviceCidr {services} overlap; choose disjoint ranges"
            )
        return self


class Addon(WireModel):
    """One optional component installed into the tenant cluster."""

    enabled: bool = True


class AddonsSpec(WireModel):
    """Tenant add-ons Nest installs once the tenant API answers."""

    core_dns: Addon = Field(default_factory=Addon, alias="coreDNS")
    kube_proxy: Addon = Field(default_factory=Addon)
    konnectivity: Addon = Field(default_factory=Addon)


class ClusterSpec(WireModel):
    """The desired state of a hosted control plane. Every field has a default."""

    kubernetes_version: str = Field(
        default=NEWEST_VERSION,
        description=f"Kubernetes version; one of {', '.join(SUPPORTED_VERSIONS)}.",
    )
    control_plane: ControlPlaneSpec = Field(default_factory=ControlPlaneSpec)
    datastore: DatastoreSpec = Field(default_factory=DatastoreSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    addons: AddonsSpec = Field(default_factory=AddonsSpec)

    @field_validator("kubernetes_version")
    @classmethod
    def _supported(cls, value: str) -> str:
        cleaned = value.removeprefix("v")
        if cleaned not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{value!r} is not supported; supported versions: {', '.join(SUPPORTED_VERSIONS)}"
            )
        return cleaned


ConditionStatus = Literal["True", "False", "Unknown"]
Phase = Literal[
    "Pending",
    "Provisioning",
    "Ready",
    "Upgrading",
    "Restoring",
    "Degraded",
    "Deleting",
    "Failed",
]


class Condition(WireModel):
    """One observation about a resource, as Kubernetes API conventions define conditions."""

    type: str
    status: ConditionStatus
    reason: str = ""
    message: str = ""
    last_transition_time: datetime


class ClusterEndpoint(WireModel):
    """Where the hosted API server answers."""

    host: str
    port: int = Field(ge=1, le=65535)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


# Intents: nest.intent.provisioner.<verb>


class ReconcileCluster(WireModel):
    """Bring cluster `cluster_id` to `spec` at `generation`. Sent on create and on every change."""

    cluster_id: str
    name: str
    generation: int = Field(ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    spec: ClusterSpec


class DeleteCluster(WireModel):
    """Remove everything Nest created for the cluster, then report `deleted`."""

    cluster_id: str
    name: str
    generation: int = Field(ge=1)


# Events: nest.event.cluster.<name>


class ClusterStatusChanged(WireModel):
    """The observed status of a cluster as its owner (the provisioner) sees it now."""

    cluster_id: str
    observed_generation: int = Field(ge=0)
    phase: Phase
    reason: str = ""
    message: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    endpoint: ClusterEndpoint | None = None


class ClusterDeclared(WireModel):
    """The API accepted a cluster or a change to it (published by the API through its outbox).

    Lets other services follow the set of clusters and their names and versions without reading
    the API's database: the backup service schedules "all clusters" policies from it.
    """

    cluster_id: str
    name: str
    generation: int = Field(ge=1)
    kubernetes_version: str
    labels: dict[str, str] = Field(default_factory=dict)
    deletion_requested: bool = False


class ClusterDeleted(WireModel):
    """Everything of the cluster is gone from the management cluster."""

    cluster_id: str
    observed_generation: int = Field(ge=0)
