"""The `nest` command line: run the appliance or one service, and manage clusters over HTTP."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli import backups, clusters, restore, tokens
from cli.kit import error, group, note, say
from cli.kit import settings as load
from libs.common.settings import Settings

app = group("Nest: hosted Kubernetes control planes on bare metal.")


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


@app.command()
def up() -> None:
    """Run the whole appliance: NATS, SQLite, local backups.

    Everything is stored in NEST_DATA_DIR (default ~/.nest); the API listens on NEST_API_HOST and
    NEST_API_PORT (default 127.0.0.1:8080). Ctrl-C stops it all.
    """
    from cli.supervisor import Supervisor

    settings = load()
    token_file = settings.data_dir / "admin-token"
    first_start = not token_file.exists() and settings.admin_token is None
    store = (
        f"s3://{settings.backup_s3_bucket}/{settings.backup_s3_prefix}"
        if settings.backup_s3_bucket
        else str(settings.backup_dir or settings.data_dir / "backups")
    )

    def ready() -> None:
        say(("Nest is starting", "bold green"), f" — API at {settings.api_url}/api/v1")
        say(f"  OpenAPI: {settings.api_url}/api/v1/openapi.json")
        say(f"  Data:    {settings.data_dir}   Logs: {settings.data_dir / 'logs'}")
        say(f"  Backups: {store}")
        if first_start and _wait_for(token_file, 30):
            say(f"  Admin token (shown once; also in {token_file}, mode 0600):")
            say(f"    {token_file.read_text().strip()}")
        elif settings.admin_token:
            say("  Admin token: the value of NEST_ADMIN_TOKEN")
        else:
            say(f"  Admin token: in {token_file} (more: nest token create)")
        if not settings.kubeconfig and "KUBERNETES_SERVICE_HOST" not in os.environ:
            say(
                "  No management cluster (NEST_KUBECONFIG): clusters are accepted and stay "
                'Pending; see the README\'s "See it work on one machine".'
            )
        say("  Press Ctrl-C to stop.")

    supervisor = Supervisor(settings, list(SERVICES), say=note)
    code = supervisor.run(on_ready=ready)
    say("Nest stopped.")
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
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="api, provisioner or backup.")],
) -> None:
    """Run one service in the foreground (for compose, Helm)."""
    runner = SERVICES.get(service)
    if runner is None:
        raise error(f"unknown service {service!r}; one of: {', '.join(SERVICES)}", code=2)
    runner(load())


app.command()(tokens.login)
app.add_typer(clusters.app, name="clusters")
app.add_typer(tokens.app, name="token")
app.add_typer(backups.app, name="backups")
app.add_typer(restore.app, name="restore")


def main() -> None:
    app(prog_name="nest")


if __name__ == "__main__":
    main()
