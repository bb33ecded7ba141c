"""`nest backups …`: list backups, back up now, restore a cluster's etcd from a backup.

Thin: every command is a few API calls (`/api/v1/backups`, `/api/v1/clusters/{id}/restores`)
rendered as a listing; `run` and `restore` follow what they started until it ends, with a
spinner, and report the outcome. `run` checks first that a cluster can be backed up at all (its
etcd is ready) and says why not, rather than requesting a backup bound to fail.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from cli import clusters
from cli.client import ApiClient, ApiError
from cli.kit import (
    ApiUrl,
    Column,
    all_items,
    connect,
    console,
    error,
    errors,
    fail,
    group,
    listing,
    note,
    say,
    size,
    when,
)

app = group("Backups: list, back up now, restore a cluster.")

TERMINAL = {"Succeeded", "Failed"}
POLL_SECONDS = 1.0

BACKUP_COLUMNS = (
    # The id (which starts with the backup's UTC time) and the target are what a restore needs.
    Column("ID"),
    Column("TARGET"),
    Column("STATE"),
    Column("SIZE", priority=2, justify="right"),
    Column("NOTES", priority=1, wrap=True),
)


def notes(item: dict[str, Any]) -> str:
    """Why it failed, or what was checked: verified, encrypted, the last drill."""
    if item["state"] == "Failed":
        return ": ".join(part for part in (item.get("reason"), item.get("message")) if part)
    checks = []
    if item.get("verified"):
        checks.append("verified")
    if item.get("encrypted"):
        key = item.get("encryptionKeyId")
        checks.append(f"encrypted ({key})" if key else "encrypted")
    drill = item.get("lastDrill") or {}
    if drill:
        checks.append("drill ok" if drill.get("passed") else "DRILL FAILED")
    return ", ".join(checks) or "-"


def backup_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [item["id"], item["target"], item["state"], size(item.get("storedBytes")), notes(item)]
        for item in items
    ]


@app.command("list")
def backups_list(
    target: Annotated[
        str | None, typer.Option("--target", metavar="TARGET", help="foundry or cluster-NAME.")
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option("--cluster", metavar="CLUSTER", help="Only this cluster's (name or id)."),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option("--state", metavar="STATE", help="Running, Completed, Failed or Pruned."),
    ] = None,
    api_url: ApiUrl = None,
) -> None:
    """List backups, oldest first."""
    try:
        with connect(api_url) as client:
            cluster_id = clusters.resolve(client, cluster)["id"] if cluster else None
            items = all_items(client, "/backups", target=target, state=state, clusterId=cluster_id)
    except ApiError as exc:
        raise fail(exc) from None
    if not items:
        say("No backups.")
        return
    console.print(listing(BACKUP_COLUMNS, backup_rows(items)))


@app.command("run")
def backups_run(
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster", metavar="CLUSTER", help="Back up this cluster's etcd (name or id)."
        ),
    ] = None,
    foundry: Annotated[bool, typer.Option("--foundry", help="Back up the Foundry DB.")] = False,
    policy: Annotated[
        str | None, typer.Option("--policy", metavar="ID", help="Under this backup policy.")
    ] = None,
    location: Annotated[
        str | None, typer.Option("--location", metavar="ID", help="To this backup location.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the backup until it ends.")
    ] = True,
    timeout: Annotated[
        int, typer.Option("--timeout", metavar="SECONDS", help="How long to follow it.")
    ] = 600,
    api_url: ApiUrl = None,
) -> None:
    """Back up the Foundry DB (--foundry) or a cluster (--cluster) now.

    Follows the backup until it ends (--no-wait: only request it). A cluster is backed up only
    if its etcd is ready; otherwise this says why and requests nothing.
    """
    if foundry == (cluster is not None):
        raise error("give exactly one of --foundry and --cluster", code=2)
    try:
        with connect(api_url) as client:
            body: dict[str, Any] = {"target": "foundry" if foundry else "cluster"}
            target = "foundry"
            if cluster:
                found = clusters.resolve(client, cluster)
                if not clusters.datastore_ready(found):
                    why, hints = clusters.explain(found)
                    raise error(
                        f"cluster {found['name']} cannot be backed up: its etcd is not ready; "
                        + why,
                        *hints,
                    )
                body["clusterId"] = found["id"]
                target = f"cluster-{found['name']}"
            if policy:
                body["policyId"] = policy
            if location:
                body["locationId"] = location
            known = set()
            if wait:
                known = {item["id"] for item in all_items(client, "/backups", target=target)}
            accepted = client.call("POST", "/backups", json=body)
            target = accepted["target"]
            if not wait:
                say(
                    f"Backup of {target} requested (intent {accepted['intentId']}); "
                    f"see `nest backups list --target {target}`."
                )
                return
            note(f"Backup of {target} requested.")
            backup = follow_backup(client, target, known, timeout)
    except ApiError as exc:
        raise fail(exc) from None
    if backup is None:
        raise error(
            f"the backup service has not started the backup of {target} within {timeout:.0f} s",
            "It stays queued. Is the backup service running? `nest up` runs it (its log: "
            "logs/backup.log in the data dir); `nest backups list` shows the backup once it runs.",
        )
    if backup["state"] == "Failed":
        raise error(f"backup {backup['id']} of {target} failed: {notes(backup)}")
    if backup["state"] != "Completed":
        raise error(
            f"backup {backup['id']} of {target} is still {backup['state']} after "
            f"{timeout:.0f} s; it goes on in the background (`nest backups list`)"
        )
    say(
        ("Completed", "green"),
        f" backup {backup['id']} of {target}: {size(backup.get('storedBytes'))}, {notes(backup)}.",
    )


def follow_backup(
    client: ApiClient, target: str, known: set[str], timeout: float
) -> dict[str, Any] | None:
    """The backup of `target` that appears after the request (an id not in `known`, not a
    scheduled one), followed until it ends or `timeout` passes; None if none appeared."""
    started = time.monotonic()
    backup: dict[str, Any] | None = None
    with errors.status("Waiting for the backup service to start it…") as status:
        while time.monotonic() - started < timeout:
            fresh = [
                item
                for item in all_items(client, "/backups", target=target)
                if item["id"] not in known and item.get("trigger") != "schedule"
            ]
            if fresh:
                backup = fresh[-1]
                if backup["state"] != "Running":
                    return backup
                status.update(f"{backup['id']}: Running… {time.monotonic() - started:.0f} s")
            time.sleep(POLL_SECONDS)
    return backup


@app.command("restore")
def backups_restore(
    backup: Annotated[
        str, typer.Argument(metavar="BACKUP", help="The backup's id (`nest backups list`).")
    ],
    cluster: Annotated[
        str,
        typer.Option("--cluster", metavar="CLUSTER", help="The cluster to restore (name or id)."),
    ],
    force: Annotated[
        bool,
        typer.Option("--force", help="Restore even over newer data, or another cluster's backup."),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the restore until it ends.")
    ] = True,
    timeout: Annotated[
        int, typer.Option("--timeout", metavar="SECONDS", help="How long to follow it.")
    ] = 1800,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    api_url: ApiUrl = None,
) -> None:
    """Restore a cluster's etcd from a backup (admin).

    The cluster's control plane is stopped while its etcd is restored.
    """
    try:
        with connect(api_url) as client:
            found = clusters.resolve(client, cluster)
            if not yes and not typer.confirm(
                f"Replace the etcd data of cluster {found['name']} with backup {backup}? "
                "Its control plane is stopped during the restore."
            ):
                raise typer.Exit(1)
            restore = client.call(
                "POST",
                f"/clusters/{found['id']}/restores",
                json={"backupId": backup, "force": force},
            )
            say(f"Restore {restore['id']} of {found['name']}: {restore['phase']}")
            if not wait:
                return
            restore = follow_restore(client, found["id"], restore, timeout)
    except ApiError as exc:
        raise fail(exc) from None
    if restore["phase"] == "Failed":
        why = " ".join(p for p in (restore.get("reason"), restore.get("message")) if p)
        raise error(f"restore failed: {why}")
    if restore["phase"] != "Succeeded":
        raise error(f"still {restore['phase']} after {timeout:.0f} s; it goes on in the background")
    revision = restore.get("etcdRevision")
    say(
        ("Restored", "green"),
        f" {found['name']} from {backup}" + (f" (etcd revision {revision})" if revision else ""),
    )


def follow_restore(
    client: ApiClient, cluster_id: str, restore: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """The restore, polled until it ends or `timeout` passes; each new phase is printed."""
    seen = restore["phase"]
    deadline = time.monotonic() + timeout
    with errors.status(f"{seen}…") as status:
        while restore["phase"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            restore = client.call("GET", f"/clusters/{cluster_id}/restores/{restore['id']}")
            if restore["phase"] != seen:
                seen = restore["phase"]
                say(f"  {when(restore.get('updatedAt'))}  {seen}")
                status.update(f"{seen}…")
    return restore
