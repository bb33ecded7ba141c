"""Request/reply: check that a backup location (an S3 bucket or a local directory) works.

Subject `nest.rpc.backup.probe_location` (core NATS request/reply, `Bus.request`), answered by
the backup service with its own store code: it writes, reads back and deletes a small probe
object. The request is `ProbeLocationRequest` (the spec, secret included: it only travels on
the bus, never into a log); the result `LocationProbed`. Failures come back as `RpcError` kinds:

- `bucket-not-found`: the bucket does not exist;
- `credentials-rejected`: the store refused the access key id or secret access key;
- `access-denied`: the credentials are valid but may not write/read/delete there;
- `endpoint-unreachable`: DNS, connection refused or timed out;
- `endpoint-untrusted`: the endpoint's TLS certificate is not trusted;
- `endpoint-forbidden`: the endpoint is link-local or a cloud-metadata address;
- `store-error`: anything else the store answered (the local directory is not writable, ...);
- `invalid`: the request itself is malformed.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic.alias_generators import to_camel

from libs.common.contract.base import WireModel
from libs.common.contract.rpc import RpcMethod

PROBE_LOCATION_RPC_SUBJECT = "nest.rpc.backup.probe_location"
ProbeErrorKind = Literal[
    "bucket-not-found",
    "credentials-rejected",
    "access-denied",
    "endpoint-unreachable",
    "endpoint-untrusted",
    "endpoint-forbidden",
    "store-error",
    "invalid",
]


class BackupLocationSpec(WireModel):
    """Where backups go: an S3-compatible bucket (`kind: s3`) or a directory (`kind: local`)."""

    kind: Literal["s3", "local"] = Field(description="`s3` or `local`.")
    endpoint_url: str | None = Field(
        default=None,
        max_length=2048,
        description="S3 endpoint, e.g. https://s3.example.com; absent: AWS for the region.",
    )
    bucket: str | None = Field(default=None, min_length=3, max_length=63)
    prefix: str = Field(default="", max_length=512, description="Key prefix inside the bucket.")
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    access_key_id: str | None = Field(default=None, min_length=1, max_length=256)
    secret_access_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Write-only: never returned.",
        json_schema_extra={"writeOnly": True},
    )
    path_style: bool = Field(
        default=False, description="Address the bucket as <endpoint>/<bucket> (MinIO, SeaweedFS)."
    )
    path: str | None = Field(
        default=None, max_length=4096, description="Absolute directory (kind `local`)."
    )

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Self:
        if self.kind == "s3":
            for name in ("bucket", "access_key_id", "secret_access_key"):
                if not getattr(self, name):
                    raise ValueError(f"{to_camel(name)} is required for an s3 location")
            if self.path is not None:
                raise ValueError("path is only for a local location")
        else:
            if not self.path or not self.path.startswith("/"):
                raise ValueError("path must be an absolute directory for a local location")
            if any(getattr(self, name) for name in ("endpoint_url", "bucket", "access_key_id")):
                raise ValueError("endpointUrl, bucket and credentials are only for s3")
        return self


class ProbeLocationRequest(WireModel):
    """Probe this location now."""

    spec: BackupLocationSpec


class LocationProbed(WireModel):
    """The location accepted a write, a read-back and a delete."""

    ok: bool = True
    description: str = Field(description="Where it probed, without credentials.")


PROBE_LOCATION_RPC: RpcMethod[ProbeLocationRequest, LocationProbed] = RpcMethod(
    PROBE_LOCATION_RPC_SUBJECT,
    ProbeLocationRequest,
    LocationProbed,
    "Write, read back and delete a probe object in a backup location.",
)
