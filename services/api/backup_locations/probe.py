"""The live check of a backup location: the endpoint rule here, the probe by the backup service.

The endpoint is refused here first (link-local and cloud-metadata hosts, by name and by the
addresses it resolves to, the same rule webhooks and the backup service's store apply); then the
backup service writes, reads back and deletes a probe object over `nest.rpc.backup.probe_location`.
A failure becomes a 422 naming the field to fix; no answer from any backup service, a 503.
"""

from __future__ import annotations

from libs.common.bus import Bus, BusUnavailable, RpcError
from libs.common.contract.backup_location import (
    PROBE_LOCATION_RPC_SUBJECT,
    BackupLocationSpec,
    LocationProbed,
    ProbeLocationRequest,
)
from libs.common.egress import EgressRefused as RefusedTarget
from libs.common.egress import check_resolved, check_url
from services.api.kit.problems import FieldError, InvalidInput, Unavailable

PROBE_TIMEOUT_SECONDS = 30.0

# RPC error kind -> (field, what to tell the user)
FIELD_OF_KIND: dict[str, tuple[str, str]] = {
    "bucket-not-found": ("spec.bucket", "the bucket does not exist"),
    "credentials-rejected": (
        "spec.secretAccessKey",
        "the store rejected the credentials (access key id or secret access key)",
    ),
    "access-denied": (
        "spec.accessKeyId",
        "these credentials may not write, read and delete in the bucket",
    ),
    "endpoint-unreachable": ("spec.endpointUrl", "the endpoint does not answer"),
    "endpoint-untrusted": ("spec.endpointUrl", "the endpoint's TLS certificate is not trusted"),
    "endpoint-forbidden": ("spec.endpointUrl", "link-local and metadata endpoints are refused"),
    "invalid": ("spec", "the backup service refused the spec"),
}


def _refuse(field: str, message: str, detail: str) -> InvalidInput:
    return InvalidInput(
        f"invalid input: {field}: {message}: {detail}",
        errors=[FieldError(field=field, message=f"{message}: {detail}")],
    )


async def check_endpoint(url: str) -> None:
    """Refuse a link-local or metadata endpoint, by its text and by what it resolves to."""
    try:
        check_url(url)
        await check_resolved(url)
    except RefusedTarget as exc:
        raise _refuse("spec.endpointUrl", "refused endpoint", str(exc)) from None
    except OSError as exc:
        raise _refuse(
            "spec.endpointUrl", "the endpoint's host does not resolve", str(exc)
        ) from None


async def probe(bus: Bus, spec: BackupLocationSpec) -> LocationProbed:
    """Have a backup service probe the location; raises InvalidInput or Unavailable."""
    if spec.kind == "s3" and spec.endpoint_url:
        await check_endpoint(spec.endpoint_url)
    if not bus.connected:
        raise Unavailable("the message bus is not connected; retry shortly")
    request = ProbeLocationRequest(spec=spec)
    try:
        result = await bus.request(
            PROBE_LOCATION_RPC_SUBJECT, request.wire(), timeout=PROBE_TIMEOUT_SECONDS
        )
    except BusUnavailable as exc:
        raise Unavailable(str(exc)) from None
    except RpcError as exc:
        if exc.kind == "store-error":
            field = "spec.path" if spec.kind == "local" else "spec"
            raise _refuse(field, "the location is not usable", exc.message) from None
        if exc.kind in FIELD_OF_KIND:
            field, message = FIELD_OF_KIND[exc.kind]
            raise _refuse(field, message, exc.message) from None
        raise Unavailable(
            f"no backup service could check the location ({exc.kind}): {exc.message}"
        ) from None
    return LocationProbed.model_validate(result)
