"""The `nest` command line: run the appliance or one service, and manage clusters over HTTP."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cli.backups import backups_app
from cli.client import ApiClient, ApiError, save_token
from cli.restore import app as restore_app
from libs.common.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="Nest: hosted Kubernetes control planes on bare metal.", no_args_is_help=True
)
clusters_app = typer.Typer(help="Manage clusters.", no_args_is_help=True)
app.add_typer(clusters_app, name="clusters")
token_app = typer.Typer(help="Manage API tokens (admin).", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(restore_app, name="restore")
app.add_typer(backups_app, name="backups")

console = Console()
errors = Console(stderr=True)


def _run_api(settings: Settings) -> None:
    from services.api.main import run

    run(settings)


def _run_provisioner(settings: Settings) -> None:
    from services.provisioner.main import run

    run(settings)


def _run_backup(settings: Settings) -> None:
    from services.backup.main import run

    run(settings)


# Every service that exists, in start order. `nest up` runs each as its own process.
SERVICES: dict[str, Callable[[Settings], None]] = {
    "api": _run_api,
    "provisioner": _run_provisioner,
    "backup": _run_backup,
}


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        errors.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def up() -> None:
    """Run the whole appliance on embedded defaults (NATS, SQLite, local backups)."""
    from cli.supervisor import Supervisor

    settings = _settings()
    token_file = settings.data_dir / "admin-token"
    first_start = not token_file.exists() and settings.admin_token is None

    def ready() -> None:
        console.print(
            f"[bold green]Nest is starting[/bold green] — API at {settings.api_url}/api/v1"
        )
        console.print(f"  OpenAPI: {settings.api_url}/api/v1/openapi.json")
        console.print(f"  Data:    {settings.data_dir}   Logs: {settings.data_dir / 'logs'}")
        if first_start and _wait_for(token_file, 30):
            console.print(f"  Admin token (shown once; also in {token_file}, mode 0600):")
            console.print(f"    {token_file.read_text().strip()}", markup=False, highlight=False)
        elif settings.admin_token:
            console.print("  Admin token: the value of NEST_ADMIN_TOKEN")
        else:
            console.print(f"  Admin token: in {token_file} (more: nest token create)")
        console.print("  Press Ctrl-C to stop.")

    supervisor = Supervisor(settings, list(SERVICES), say=errors.print)
    code = supervisor.run(on_ready=ready)
    console.print("Nest stopped.")
    raise typer.Exit(code)


def _wait_for(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return True
        time.sleep(0.1)
    return False


@app.command("run")
def run_service(
    service: Annotated[str, typer.Argument(help="api, provisioner or backup")],
) -> None:
    """Run one service in the foreground (what compose and Helm use)."""
    runner = SERVICES.get(service)
    if runner is None:
        errors.print(f"[red]unknown service {service!r}; one of: {', '.join(SERVICES)}[/red]")
        raise typer.Exit(2)
    runner(_settings())


ApiUrl = Annotated[
    str | None, typer.Option("--api-url", envvar="NEST_API_URL", help="Default: from settings.")
]


def _client(api_url: str | None) -> ApiClient:
    return ApiClient(api_url or _settings().api_url)


def _fail(exc: ApiError) -> typer.Exit:
    errors.print(f"[red]error:[/red] {exc}")
    for item in exc.errors:
        errors.print(f"  - {item.get('field')}: {item.get('message')}")
    return typer.Exit(1)


def _cluster_table(items: list[dict[str, Any]]) -> Table:
    table = Table(show_lines=False)
    for column in ("NAME", "ID", "VERSION", "PHASE", "GEN", "ENDPOINT", "CREATED"):
        table.add_column(column)
    for item in items:
        status = item.get("status", {})
        endpoint = status.get("endpoint") or {}
        table.add_row(
            item["name"],
            item["id"],
            item["spec"]["kubernetesVersion"],
            status.get("phase", ""),
            f"{status.get('observedGeneration', 0)}/{item['generation']}",
            f"{endpoint['host']}:{endpoint['port']}" if endpoint else "-",
            item["createdAt"][:19].replace("T", " "),
        )
    return table


def _resolve(client: ApiClient, ref: str) -> dict[str, Any]:
    """A cluster by id, or by name when no id matches."""
    try:
        found: dict[str, Any] = client.call("GET", f"/clusters/{ref}")
        return found
    except ApiError as exc:
        if exc.status != 404:
            raise
    cursor: str | None = None
    while True:
        page = client.call(
            "GET", "/clusters", params={"limit": 500, **({"cursor": cursor} if cursor else {})}
        )
        for item in page["items"]:
            if item["name"] == ref:
                return dict(item)
        cursor = page.get("next")
        if not cursor:
            raise ApiError(f"no cluster with id or name {ref!r}", status=404)


@clusters_app.command("list")
def clusters_list(api_url: ApiUrl = None) -> None:
    """List clusters."""
    items: list[dict[str, Any]] = []
    try:
        with _client(api_url) as client:
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"limit": 500}
                if cursor:
                    params["cursor"] = cursor
                page = client.call("GET", "/clusters", params=params)
                items += page["items"]
                cursor = page.get("next")
                if not cursor:
                    break
    except ApiError as exc:
        raise _fail(exc) from None
    if not items:
        console.print("No clusters.")
        return
    console.print(_cluster_table(items))


@clusters_app.command("create")
def clusters_create(
    name: str,
    version: Annotated[str | None, typer.Option("--version", help="Kubernetes version.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Control-plane replicas (1-5).")] = None,
    service_type: Annotated[str | None, typer.Option(help="LoadBalancer or NodePort.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value, repeatable.")] = None,
    api_url: ApiUrl = None,
) -> None:
    """Create a cluster; unspecified fields take their defaults."""
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
            errors.print(f"[red]error:[/red] --label {item!r} must be key=value")
            raise typer.Exit(2)
        labels[key] = value
    try:
        with _client(api_url) as client:
            created = client.call(
                "POST", "/clusters", json={"name": name, "labels": labels, "spec": spec}
            )
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(_cluster_table([created]))


@clusters_app.command("get")
def clusters_get(
    ref: Annotated[str, typer.Argument(help="Id or name.")], api_url: ApiUrl = None
) -> None:
    """Show one cluster with its conditions."""
    try:
        with _client(api_url) as client:
            cluster = _resolve(client, ref)
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(_cluster_table([cluster]))
    status = cluster.get("status", {})
    if status.get("message"):
        console.print(f"[bold]{status.get('reason') or 'Status'}[/bold]: {status['message']}")
    conditions = status.get("conditions") or []
    if conditions:
        table = Table(title="Conditions")
        for column in ("TYPE", "STATUS", "REASON", "MESSAGE", "SINCE"):
            table.add_column(column)
        for c in conditions:
            table.add_row(
                c["type"],
                c["status"],
                c.get("reason", ""),
                c.get("message", ""),
                c.get("lastTransitionTime", "")[:19].replace("T", " "),
            )
        console.print(table)


@clusters_app.command("delete")
def clusters_delete(
    ref: Annotated[str, typer.Argument(help="Id or name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    api_url: ApiUrl = None,
) -> None:
    """Delete a cluster (its control plane and data are removed)."""
    try:
        with _client(api_url) as client:
            cluster = _resolve(client, ref)
            if not yes and not typer.confirm(f"Delete cluster {cluster['name']} and all its data?"):
                raise typer.Exit(1)
            deleted = client.call("DELETE", f"/clusters/{cluster['id']}")
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(f"Cluster {deleted['name']} is {deleted['status']['phase']}.")


@app.command()
def login(
    token: Annotated[str, typer.Option(prompt=True, hide_input=True, help="An API token.")],
    api_url: ApiUrl = None,
) -> None:
    """Check a token against the API and save it for later commands (mode 0600)."""
    try:
        with ApiClient(api_url or _settings().api_url, token=token) as client:
            client.call("GET", "/clusters", params={"limit": 1})
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(f"Token saved to {save_token(token)}.")


def _token_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    for column in ("NAME", "ID", "SCOPE", "PREFIX", "ACTIVE", "EXPIRES", "CREATED"):
        table.add_column(column)
    for item in items:
        status = item["status"]
        table.add_row(
            item["name"],
            item["id"],
            item["spec"]["scope"],
            status["prefix"] + "…",
            "yes" if status["active"] else ("revoked" if status.get("revokedAt") else "expired"),
            status["expiresAt"][:10],
            item["createdAt"][:19].replace("T", " "),
        )
    return table


@token_app.command("create")
def token_create(
    name: str,
    scope: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    days: Annotated[int, typer.Option(help="Lifetime in days.")] = 365,
    api_url: ApiUrl = None,
) -> None:
    """Create a token; its secret is printed once."""
    body = {"name": name, "spec": {"scope": scope, "expiresInDays": days}}
    try:
        with _client(api_url) as client:
            created = client.call("POST", "/tokens", json=body)
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(_token_table([created]))
    console.print("Secret (shown once, store it now):")
    console.print(created["token"], markup=False, highlight=False)


@token_app.command("list")
def token_list(api_url: ApiUrl = None) -> None:
    """List tokens (never their secrets)."""
    items: list[dict[str, Any]] = []
    try:
        with _client(api_url) as client:
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
                page = client.call("GET", "/tokens", params=params)
                items += page["items"]
                cursor = page.get("next")
                if not cursor:
                    break
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(_token_table(items))


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id.")], api_url: ApiUrl = None
) -> None:
    """Revoke a token at once."""
    try:
        with _client(api_url) as client:
            revoked = client.call("DELETE", f"/tokens/{token_id}")
    except ApiError as exc:
        raise _fail(exc) from None
    console.print(f"Token {revoked['name']} ({revoked['id']}) is revoked.")


@clusters_app.command("kubeconfig")
def clusters_kubeconfig(
    ref: Annotated[str, typer.Argument(help="Id or name.")],
    hours: Annotated[float, typer.Option(help="Certificate lifetime, at most 24.")] = 8,
    api_url: ApiUrl = None,
) -> None:
    """Print a short-lived admin kubeconfig for a cluster (redirect it to a file)."""
    try:
        with _client(api_url) as client:
            cluster = _resolve(client, ref)
            issued = client.call(
                "GET",
                f"/clusters/{cluster['id']}/kubeconfig",
                params={"ttlSeconds": int(hours * 3600)},
            )
    except ApiError as exc:
        raise _fail(exc) from None
    sys.stdout.write(issued["kubeconfig"])
    errors.print(f"expires {issued['expiresAt']}")


def main() -> None:
    app(prog_name="nest")


if __name__ == "__main__":
    main()
