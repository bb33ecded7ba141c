"""`nest token …` (create, list, revoke API tokens; admin) and `nest login` (save a token)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer

from cli.client import ApiClient, ApiError, save_token
from cli.kit import (
    ApiUrl,
    Column,
    age,
    all_items,
    by_id_prefix,
    connect,
    console,
    fail,
    group,
    listing,
    say,
    short_ids,
)

app = group("Manage API tokens (admin).")

TOKEN_COLUMNS = (
    Column("NAME"),
    Column("ID"),
    Column("SCOPE", priority=1),
    Column("STATE", priority=1),
    Column("EXPIRES", priority=2),
    Column("PREFIX", priority=3),
    Column("AGE", priority=4, justify="right"),
)


def token_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    length = short_ids([item["id"] for item in items])
    rows = []
    for item in items:
        status = item["status"]
        state = (
            "active" if status["active"] else "revoked" if status.get("revokedAt") else "expired"
        )
        rows.append(
            [
                item["name"],
                item["id"][:length],
                item["spec"]["scope"],
                state,
                status["expiresAt"][:10],
                status["prefix"] + "…",
                age(item.get("createdAt")),
            ]
        )
    return rows


def resolve(client: ApiClient, ref: str) -> dict[str, Any]:
    """A token by id, the start of its id, or its name if one active token has it."""
    try:
        found: dict[str, Any] = client.call("GET", f"/tokens/{quote(ref, safe='')}")
        return found
    except ApiError as exc:
        if exc.status not in (404, 422):
            raise
    items = all_items(client, "/tokens")
    named = [item for item in items if item["name"] == ref and item["status"]["active"]]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ApiError(f"{len(named)} active tokens are named {ref!r}: give the id")
    prefixed = by_id_prefix(items, ref, "token")
    if prefixed is not None:
        return prefixed
    raise ApiError(
        f"no token with the id or name {ref!r}", status=404, hints=["`nest token list` shows them"]
    )


@app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="What the token is for.")],
    scope: Annotated[
        str, typer.Option("--scope", metavar="SCOPE", help="viewer, operator or admin.")
    ] = "viewer",
    days: Annotated[int, typer.Option("--days", metavar="DAYS", help="Lifetime in days.")] = 365,
    api_url: ApiUrl = None,
) -> None:
    """Create a token; its secret is printed once, on the last line."""
    body = {"name": name, "spec": {"scope": scope, "expiresInDays": days}}
    try:
        with connect(api_url) as client:
            created = client.call("POST", "/tokens", json=body)
    except ApiError as exc:
        raise fail(exc) from None
    console.print(listing(TOKEN_COLUMNS, token_rows([created])))
    say("Secret (shown once, store it now):")
    say(created["token"])


@app.command("list")
def token_list(api_url: ApiUrl = None) -> None:
    """List tokens (never their secrets).

    Ids are shortened to what tells them apart; `nest token revoke` takes that.
    """
    try:
        with connect(api_url) as client:
            items = all_items(client, "/tokens")
    except ApiError as exc:
        raise fail(exc) from None
    console.print(listing(TOKEN_COLUMNS, token_rows(items)))


@app.command("revoke")
def token_revoke(
    ref: Annotated[
        str, typer.Argument(metavar="TOKEN", help="Its id, id prefix, or name if unique.")
    ],
    api_url: ApiUrl = None,
) -> None:
    """Revoke a token at once."""
    try:
        with connect(api_url) as client:
            token = resolve(client, ref)
            revoked = client.call("DELETE", f"/tokens/{token['id']}")
    except ApiError as exc:
        raise fail(exc) from None
    say(f"Token {revoked['name']} ({revoked['id']}) is revoked.")


def login(
    token: Annotated[
        str,
        typer.Option(
            "--token", prompt=True, hide_input=True, metavar="TOKEN", help="An API token."
        ),
    ],
    api_url: ApiUrl = None,
) -> None:
    """Check a token and save it for later commands.

    It is saved in ~/.config/nest/config.json (mode 0600); NEST_TOKEN, when set, wins.
    """
    try:
        with connect(api_url, token=token) as client:
            client.call("GET", "/clusters", params={"limit": 1})
    except ApiError as exc:
        raise fail(exc) from None
    say(f"Token saved to {save_token(token)}.")
