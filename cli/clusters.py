"""`nest clusters …`: create, list, show and delete clusters, and issue a kubeconfig for one.

Every command that takes a cluster takes its id, the start of its id (as listings show it) or
its name. When a cluster cannot do what is asked (no kubeconfig without an endpoint, no backup
while its etcd is not ready), the commands say why from the cluster's own conditions — most
often, on a first try, that Nest has no management cluster to run control planes in.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from cli.client import ApiClient, ApiError
from cli.kit import (
    ApiUrl,
    Column,
    age,
    all_items,
    by_id_prefix,
    connect,
    console,
    details,
    error,
    fail,
    group,
    listing,
    note,
    say,
    short_ids,
    when,
)

app = group("Manage clusters.")

MANAGEMENT = "ManagementClusterAvailable"
DATASTORE = "DatastoreReady"
MANAGEMENT_HINT = (
    "Nest needs a management cluster to run control planes in: set NEST_KUBECONFIG to its "
    "kubeconfig, or start one on this machine with scripts/dev-kube (README: "
    '"See it work on one machine").'
)


def resolve(client: ApiClient, ref: str) -> dict[str, Any]:
    """A cluster by id, name or the start of its id."""
    try:
        found: dict[str, Any] = client.call("GET", f"/clusters/{quote(ref, safe='')}")
        return found
    except ApiError as exc:
        if exc.status not in (404, 422):
            raise
    items = all_items(client, "/clusters")
    for item in items:
        if item["name"] == ref:
            return item
    prefixed = by_id_prefix(items, ref, "cluster")
    if prefixed is not None:
        return prefixed
    raise ApiError(
        f"no cluster with the id or name {ref!r}",
        status=404,
        hints=["`nest clusters list` shows every cluster's name and id"],
    )


def conditions(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (cluster.get("status") or {}).get("conditions") or []}


def explain(cluster: dict[str, Any]) -> tuple[str, list[str]]:
    """Why a cluster's control plane is not (yet) serving, from its phase and conditions, and
    what to do about it."""
    status = cluster.get("status") or {}
    phase = status.get("phase") or "Pending"
    found = conditions(cluster)
    management = found.get(MANAGEMENT)
    if management is not None and management["status"] == "False":
        why = management.get("message") or management.get("reason") or "no management cluster"
        return f"it is {phase}, with {MANAGEMENT}=False: {why}", [MANAGEMENT_HINT]
    if phase == "Deleting":
        return "it is being deleted", []
    failing = next((c for c in found.values() if c["status"] != "True"), None)
    if failing is not None:
        why = failing.get("message") or failing.get("reason") or ""
        detail = f"{failing['type']}={failing['status']}" + (f": {why}" if why else "")
    else:
        detail = status.get("message") or ""
    follow = f"follow it with `nest clusters get {cluster['name']}`"
    return f"it is {phase}" + (f" ({detail})" if detail else ""), [follow]


def datastore_ready(cluster: dict[str, Any]) -> bool:
    """Whether its etcd can be reached (what a backup needs; the provisioner's own rule)."""
    datastore = conditions(cluster).get(DATASTORE)
    return datastore is not None and datastore["status"] == "True"


CLUSTER_COLUMNS = (
    Column("NAME"),
    Column("ID"),
    Column("PHASE"),
    Column("VERSION", priority=2),
    Column("ENDPOINT", priority=1),
    Column("AGE", priority=3, justify="right"),
    Column("GEN", priority=4, justify="right"),
)


def cluster_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    length = short_ids([item["id"] for item in items])
    rows = []
    for item in items:
        status = item.get("status") or {}
        endpoint = status.get("endpoint") or {}
        rows.append(
            [
                item["name"],
                item["id"][:length],
                status.get("phase", ""),
                item["spec"]["kubernetesVersion"],
                f"{endpoint['host']}:{endpoint['port']}" if endpoint else "-",
                age(item.get("createdAt")),
                f"{status.get('observedGeneration', 0)}/{item['generation']}",
            ]
        )
    return rows


@app.command("list")
def clusters_list(api_url: ApiUrl = None) -> None:
    """List clusters.

    Ids are shortened to what tells them apart; every command takes that, the whole id or the
    name.
    """
    try:
        with connect(api_url) as client:
            items = all_items(client, "/clusters")
    except ApiError as exc:
        raise fail(exc) from None
    if not items:
        say("No clusters. Create one with `nest clusters create NAME`.")
        return
    console.print(listing(CLUSTER_COLUMNS, cluster_rows(items)))


@app.command("create")
def clusters_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A DNS label: a-z, 0-9 and '-'.")],
    version: Annotated[
        str | None, typer.Option("--version", metavar="VERSION", help="Kubernetes version.")
    ] = None,
    replicas: Annotated[
        int | None, typer.Option("--replicas", metavar="N", help="Control-plane replicas, 1 to 5.")
    ] = None,
    service_type: Annotated[
        str | None, typer.Option("--service-type", metavar="TYPE", help="LoadBalancer or NodePort.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="A label; repeatable.")
    ] = None,
    api_url: ApiUrl = None,
) -> None:
    """Create a cluster; every field not given takes its default."""
    spec: dict[str, Any] = {}
    if version:
        spec["kubernetesVersion"] = version
    if replicas is not None:
        spec["controlPlane"] = {"replicas": replicas}
    if service_type:
        spec["network"] = {"serviceType": service_type}
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise error(f"--label {item!r} must be KEY=VALUE", code=2)
        labels[key] = value
    try:
        with connect(api_url) as client:
            created = client.call(
                "POST", "/clusters", json={"name": name, "labels": labels, "spec": spec}
            )
    except ApiError as exc:
        raise fail(exc) from None
    console.print(listing(CLUSTER_COLUMNS, cluster_rows([created])))
    note(f"Follow it with `nest clusters get {created['name']}`.")


CONDITION_COLUMNS = (
    Column("TYPE"),
    Column("STATUS"),
    Column("REASON", priority=2),
    Column("MESSAGE", priority=1, wrap=True),
    Column("SINCE", priority=3),
)


@app.command("get")
def clusters_get(
    ref: Annotated[str, typer.Argument(metavar="CLUSTER", help="Its name, id or id prefix.")],
    api_url: ApiUrl = None,
) -> None:
    """Show one cluster with its conditions."""
    try:
        with connect(api_url) as client:
            cluster = resolve(client, ref)
    except ApiError as exc:
        raise fail(exc) from None
    status = cluster.get("status") or {}
    endpoint = status.get("endpoint") or {}
    spec = cluster.get("spec") or {}
    labels = ", ".join(f"{k}={v}" for k, v in sorted((cluster.get("labels") or {}).items()))
    fields = [
        ("Name", cluster["name"]),
        ("ID", cluster["id"]),
        ("Phase", status.get("phase", "")),
        ("Version", spec.get("kubernetesVersion", "")),
        ("Replicas", str((spec.get("controlPlane") or {}).get("replicas", ""))),
        ("Endpoint", f"https://{endpoint['host']}:{endpoint['port']}" if endpoint else "-"),
        ("Generation", f"{cluster['generation']} (observed {status.get('observedGeneration', 0)})"),
        ("Labels", labels or "-"),
        ("Created", when(cluster.get("createdAt")) + " UTC"),
    ]
    if status.get("message"):
        reason = status.get("reason")
        fields.append(("Status", f"{reason}: {status['message']}" if reason else status["message"]))
    console.print(details(fields))
    found = conditions(cluster).values()
    if found:
        say(("Conditions:", "bold"))
        rows = [
            [
                c["type"],
                c["status"],
                c.get("reason", ""),
                c.get("message", ""),
                when(c.get("lastTransitionTime")),
            ]
            for c in found
        ]
        console.print(listing(CONDITION_COLUMNS, rows))
    management = conditions(cluster).get(MANAGEMENT)
    if management is not None and management["status"] == "False":
        note(MANAGEMENT_HINT)


@app.command("delete")
def clusters_delete(
    ref: Annotated[str, typer.Argument(metavar="CLUSTER", help="Its name, id or id prefix.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    api_url: ApiUrl = None,
) -> None:
    """Delete a cluster (its control plane and data are removed)."""
    try:
        with connect(api_url) as client:
            cluster = resolve(client, ref)
            if not yes and not typer.confirm(f"Delete cluster {cluster['name']} and all its data?"):
                raise typer.Exit(1)
            deleted = client.call("DELETE", f"/clusters/{cluster['id']}")
    except ApiError as exc:
        raise fail(exc) from None
    say(f"Cluster {deleted['name']} is {deleted['status']['phase']}.")


@app.command("kubeconfig")
def clusters_kubeconfig(
    ref: Annotated[str, typer.Argument(metavar="CLUSTER", help="Its name, id or id prefix.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write it to FILE (mode 0600), only once it is issued. Default: stdout.",
        ),
    ] = None,
    hours: Annotated[
        float,
        typer.Option("--hours", metavar="HOURS", help="Certificate lifetime, at most 24 hours."),
    ] = 8,
    api_url: ApiUrl = None,
) -> None:
    """Issue a short-lived admin kubeconfig.

    Only for a cluster whose control plane runs (it has an endpoint). With --output the file is
    written only once the kubeconfig is issued; a redirect (> FILE) leaves an empty file behind
    when it fails.
    """
    ttl = int(hours * 3600)
    if not 60 <= ttl <= 24 * 3600:
        raise error("--hours must be between 0.02 (a minute) and 24", code=2)
    try:
        with connect(api_url) as client:
            cluster = resolve(client, ref)
            if not (cluster.get("status") or {}).get("endpoint"):
                why, hints = explain(cluster)
                raise error(f"cluster {cluster['name']} has no API endpoint yet: {why}", *hints)
            try:
                issued = client.call(
                    "GET", f"/clusters/{cluster['id']}/kubeconfig", params={"ttlSeconds": ttl}
                )
            except ApiError as exc:
                if exc.status == 503:
                    why, hints = explain(resolve(client, cluster["id"]))
                    exc.hints += [f"cluster {cluster['name']}: {why}", *hints]
                raise
    except ApiError as exc:
        raise fail(exc) from None
    if output is None:
        sys.stdout.write(issued["kubeconfig"])
        sys.stdout.flush()
        note(f"Expires {issued['expiresAt']}.")
        return
    try:
        write_private(output, issued["kubeconfig"])
    except OSError as exc:
        raise error(f"cannot write {output}: {exc.strerror or exc}") from None
    say(
        f"Wrote {output} (admin of {cluster['name']}, expires {issued['expiresAt']}): "
        f"kubectl --kubeconfig {output} get namespaces"
    )


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, whole or not at all (a temporary file in the same
    directory, renamed over `path`)."""
    path = path.expanduser()
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
