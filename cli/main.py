"""The `nest` command line: run the appliance or one service, and manage clusters over HTTP."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cli.client import ApiClient, ApiError
from libs.common.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="Nest: hosted Kubernetes control planes on bare metal.", no_args_is_help=True
)
clusters_app = typer.Typer(help="Manage clusters.", no_args_is_help=True)
app.add_typer(clusters_app, name="clusters")

console = Console()
errors = Console(stderr=True)


def _run_api(settings: Settings) -> None:
    from services.api.main import run

    run(settings)


# Every service that exists, in start order. `nest up` runs each as its own process.
SERVICES: dict[str, Callable[[Settings], None]] = {"api": _run_api}


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

    def ready() -> None:
        console.print(
            f"[bold green]Nest is starting[/bold green] — API at {settings.api_url}/api/v1"
        )
        console.print(f"  OpenAPI: {settings.api_url}/api/v1/openapi.json")
        console.print(f"  Data:    {settings.data_dir}   Logs: {settings.data_dir / 'logs'}")
        console.print("  Press Ctrl-C to stop.")

    supervisor = Supervisor(settings, list(SERVICES), say=errors.print)
    code = supervisor.run(on_ready=ready)
    console.print("Nest stopped.")
    raise typer.Exit(code)


@app.command("run")
def run_service(service: Annotated[str, typer.Argument(help="api")]) -> None:
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


def main() -> None:
    app(prog_name="nest")


if __name__ == "__main__":
    sys.exit(main())
