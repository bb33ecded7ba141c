"""`nest backups …`: list backups, back up now, restore a cluster's etcd from a backup.

Thin: every command is one or two API calls (`/api/v1/backups`, `/api/v1/clusters/{id}/restores`)
rendered as a table; `restore` follows the restore's phases until it ends.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cli.client import ApiClient, ApiError

backups_app = typer.Typer(
    help="Backups: list, back up now, restore a cluster.", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)

ApiUrl = Annotated[
    str | None, typer.Option("--api-url", envvar="NEST_API_URL", help="Default: from settings.")
]
TERMINAL = {"Succeeded", "Failed"}


def _client(api_url: str | None) -> ApiClient:
    from cli.main import _client as client

    return client(api_url)


def _fail(exc: ApiError) -> typer.Exit:
    from cli.main import _fail as fail

    return fail(exc)


def _cluster(client: ApiClient, ref: str) -> dict[str, Any]:
    from cli.main import _resolve

    return _resolve(client, ref)


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def backup_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    # The id (which starts with the backup's UTC time) and the target are what a restore
    # needs: never cut them; the checks may wrap.
    table.add_column("ID", no_wrap=True, min_width=25)
    table.add_column("TARGET", overflow="fold")
    table.add_column("STATE", overflow="fold", min_width=9)
    table.add_column("SIZE", no_wrap=True, min_width=9)
    table.add_column("CHECKS", min_width=9)
    for item in items:
        state = item["state"]
        if state == "Failed" and item.get("reason"):
            state = f"Failed: {item['reason']}"
        checks = []
        if item.get("verified"):
            checks.append("verified")
        if item.get("encrypted"):
            checks.append("encrypted")
        drill = item.get("lastDrill") or {}
        if drill:
            checks.append("drill-ok" if drill.get("passed") else "DRILL-FAILED")
        table.add_row(
            item["id"],
            item["target"],
            state,
            _size(item.get("storedBytes")),
            ", ".join(checks) or "-",
        )
    return table


@backups_app.command("list")
def backups_list(
    target: Annotated[str | None, typer.Option(help="`foundry` or `cluster-<name>`.")] = None,
    cluster: Annotated[str | None, typer.Option(help="Only this cluster (id or name).")] = None,
    state: Annotated[str | None, typer.Option(help="Running, Completed, Failed or Pruned.")] = None,
    api_url: ApiUrl = None,
) -> None:
    """List backups, oldest first."""
    items: list[dict[str, Any]] = []
    try:
        with _client(api_url) as client:
            params: dict[str, Any] = {"limit": 500}
            if target:
                params["target"] = target
            if state:
                params["state"] = state
            if cluster:
                params["clusterId"] = _cluster(client, cluster)["id"]
            while True:
                page = client.call("GET", "/backups", params=params)
                items += page["items"]
                if not page.get("next"):
                    break
                params["cursor"] = page["next"]
    except ApiError as exc:
        raise _fail(exc) from None
    if not items:
        console.print("No backups.")
        return
    console.print(backup_table(items))


@backups_app.command("run")
def backups_run(
    cluster: Annotated[
        str | None, typer.Option(help="Back up this cluster's etcd (id or name).")
    ] = None,
    foundry: Annotated[bool, typer.Option("--foundry", help="Back up the Foundry DB.")] = False,
    policy: Annotated[str | None, typer.Option(help="Under this backup policy (id).")] = None,
    location: Annotated[str | None, typer.Option(help="To this backup location (id).")] = None,
    api_url: ApiUrl = None,
) -> None:
    """Back up the Foundry DB (--foundry) or a cluster (--cluster) now."""
    if foundry == (cluster is not None):
        errors.print("[red]error:[/red] give exactly one of --foundry and --cluster")
        raise typer.Exit(2)
    try:
        with _client(api_url) as client:
            body: dict[str, Any] = {"target": "foundry" if foundry else "cluster"}
            if cluster:
                body["clusterId"] = _cluster(client, cluster)["id"]
            if policy:
                body["policyId"] = policy
            if location:
                body["locationId"] = location
            accepted = client.call("POST", "/backups", json=body)
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(
        f"Backup of {accepted['target']} requested; see `nest backups list` "
        f"(intent {accepted['intentId']})."
    )


@backups_app.command("restore")
def backups_restore(
    backup: Annotated[str, typer.Argument(help="The backup's id (see `nest backups list`).")],
    cluster: Annotated[str, typer.Option(help="The cluster to restore (id or name).")],
    force: Annotated[
        bool,
        typer.Option(help="Restore even over newer data, or another cluster's backup."),
    ] = False,
    wait: Annotated[bool, typer.Option(help="Follow the restore until it ends.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow it.")] = 1800.0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    api_url: ApiUrl = None,
) -> None:
    """Restore a cluster's etcd from a backup: its control plane stops meanwhile (admin)."""
    try:
        with _client(api_url) as client:
            found = _cluster(client, cluster)
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
            console.print(f"Restore {restore['id']} of {found['name']}: {restore['phase']}")
            if not wait:
                return
            seen = restore["phase"]
            deadline = time.monotonic() + timeout
            with console.status(f"{seen}…") as status:
                while restore["phase"] not in TERMINAL and time.monotonic() < deadline:
                    time.sleep(1.0)
                    restore = client.call(
                        "GET", f"/clusters/{found['id']}/restores/{restore['id']}"
                    )
                    if restore["phase"] != seen:
                        seen = restore["phase"]
                        console.print(f"  {_when(restore.get('updatedAt'))}  {seen}")
                        status.update(f"{seen}…")
    except ApiError as exc:
        raise _fail(exc) from None
    if restore["phase"] == "Failed":
        errors.print(
            f"[red]restore failed:[/red] {restore.get('reason') or ''} {restore.get('message', '')}"
        )
        raise typer.Exit(1)
    if restore["phase"] != "Succeeded":
        errors.print(
            f"still {restore['phase']} after {timeout:.0f} s; it goes on in the background"
        )
        raise typer.Exit(1)
    revision = restore.get("etcdRevision")
    console.print(
        f"[green]Restored[/green] {found['name']} from {backup}"
        + (f" (etcd revision {revision})" if revision else "")
    )
