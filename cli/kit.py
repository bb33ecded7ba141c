"""What every `nest` command shares: the consoles, the API client for the URL in use, error
reporting, and the one table style of every listing.

Text from the server (messages, names, labels) is shown as it is: the consoles never read rich
markup or emoji codes, so `[a-z0-9]` in a message stays `[a-z0-9]`; our own emphasis is a styled
`Text`. Messages are not wrapped by us (the terminal wraps them, and a copied path or command
stays whole); listings are fitted to the terminal's width, dropping their least important columns
rather than cutting ids or wrapping timestamps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.client import ApiClient, ApiError
from libs.common.settings import Settings, SettingsError, load_settings

console = Console(markup=False, emoji=False, highlight=False)
errors = Console(stderr=True, markup=False, emoji=False, highlight=False)


def group(help_text: str) -> typer.Typer:
    """A command group: plain help (paragraphs rewrapped to the terminal, no markup read from
    help texts) and no local variables in tracebacks (they may hold tokens)."""
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        rich_markup_mode=None,
        pretty_exceptions_show_locals=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


# Output


def _print(to: Console, text: Text) -> None:
    # On a terminal, wrapped at words; into a file or pipe, one line per message (no newlines
    # inserted at an assumed width of 80).
    to.print(text, soft_wrap=not to.is_terminal)


def say(*parts: str | Text | tuple[str, str]) -> None:
    """One message on stdout; a tuple is (text, style)."""
    _print(console, Text.assemble(*parts))


def note(*parts: str | Text | tuple[str, str]) -> None:
    """One message on stderr (progress, hints): stdout stays clean for what a command prints
    as its result."""
    _print(errors, Text.assemble(*parts))


def error(message: str, *hints: str, code: int = 1) -> typer.Exit:
    """`error: message` and each hint on its own line, on stderr; returns the exit to raise."""
    _print(errors, Text.assemble(("error:", "bold red"), " ", message))
    for hint in hints:
        _print(errors, Text("  " + hint))
    return typer.Exit(code)


def fail(exc: ApiError) -> typer.Exit:
    """An API error, once: the problem's detail, or, for invalid input, what is wrong with each
    field (the detail repeats the fields, so it is not printed as well)."""
    if not exc.errors:
        return error(str(exc), *exc.hints)
    fields = [(str(item.get("field", "")), str(item.get("message", ""))) for item in exc.errors]
    head = str(exc)
    for field, message in fields:
        at = head.find(f"{field}: {message}")
        if at >= 0:
            head = head[:at]
    head = head.rstrip(": ;") or "invalid input"
    if len(fields) == 1:
        field, message = fields[0]
        return error(f"{head}: {field}: {message}", *exc.hints)
    return error(head + ":", *(f"- {field}: {message}" for field, message in fields), *exc.hints)


# Settings and the API


def settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise error(str(exc), code=2) from None


ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        envvar="NEST_API_URL",
        metavar="URL",
        show_envvar=True,
        help="The API, as `nest up` prints it (http://127.0.0.1:8080/api/v1) or without "
        "/api/v1. Default: NEST_API_HOST and NEST_API_PORT.",
    ),
]


def connect(api_url: str | None, token: str | None = None) -> ApiClient:
    """A client for the API at `api_url` (the option or NEST_API_URL), else the one the settings
    name; its errors say where that URL came from, so a refused connection says what to fix."""
    if api_url:
        where = "NEST_API_URL" if os.environ.get("NEST_API_URL") == api_url else "--api-url"
        return ApiClient(api_url, token=token, origin=where)
    return ApiClient(settings().api_url, token=token, origin=None)


def all_items(client: ApiClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a collection, following its cursor."""
    items: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 500, **{k: v for k, v in params.items() if v is not None}}
    while True:
        page = client.call("GET", path, params=query)
        items += page["items"]
        if not page.get("next"):
            return items
        query["cursor"] = page["next"]


# Listings


@dataclass(frozen=True)
class Column:
    """A listing's column. Priority 0 is essential: always shown and never cut (names, ids,
    phases). When the terminal is too narrow the column with the highest priority goes first.
    A `wrap` column (free text) takes the room that is left and wraps at words; every other
    column stays on one line."""

    header: str
    priority: int = 0
    wrap: bool = False
    justify: str = "left"


GAP = 2  # spaces between columns
WRAP_MIN = 20  # narrower than this, free text is unreadable: drop a column instead


def listing(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None = None
) -> Table:
    """The one table style: no borders, bold headers, fitted to `width` (default: the
    console's)."""
    width = width or console.width
    widths = [
        max([cell_len(column.header), *(cell_len(row[i]) for row in rows)])
        for i, column in enumerate(columns)
    ]

    def needed(shown: list[int]) -> int:
        cells = sum(min(widths[i], WRAP_MIN) if columns[i].wrap else widths[i] for i in shown)
        return cells + GAP * (len(shown) - 1)

    shown = list(range(len(columns)))
    while needed(shown) > width:
        optional = [i for i in shown if columns[i].priority > 0]
        if not optional:
            break
        shown.remove(max(optional, key=lambda i: (columns[i].priority, i)))
    table = Table(box=None, pad_edge=False, padding=(0, GAP // 2), header_style="bold")
    for i in shown:
        column = columns[i]
        table.add_column(
            column.header,
            no_wrap=not column.wrap,
            overflow="fold" if column.wrap else "ellipsis",
            justify="right" if column.justify == "right" else "left",
        )
    for row in rows:
        table.add_row(*(Text(row[i]) for i in shown))
    return table


def details(fields: Sequence[tuple[str, str]]) -> Table:
    """One resource as `Label:  value` lines; a long value wraps under itself."""
    table = Table.grid(padding=(0, GAP // 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in fields:
        table.add_row(Text(f"{label}:"), Text(value))
    return table


def short_ids(ids: Sequence[str], minimum: int = 8) -> int:
    """How many leading characters tell these ids apart (at least `minimum`): the id prefix
    a listing shows, and which every command that takes an id accepts."""
    length = minimum
    while len({value[:length] for value in ids}) < len(set(ids)):
        length += 1
    return length


def by_id_prefix(items: Sequence[dict[str, Any]], ref: str, kind: str) -> dict[str, Any] | None:
    """The one item whose id starts with `ref`; None if none does; an error if several do."""
    if len(ref) < 4:
        return None
    found = [item for item in items if str(item["id"]).startswith(ref)]
    if len(found) > 1:
        ids = ", ".join(item["id"] for item in found)
        raise ApiError(f"{ref!r} is the start of several {kind} ids ({ids}): give more of it")
    return found[0] if found else None


# Values


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def when(value: str | None) -> str:
    """A timestamp as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    if not value:
        return "-"
    return parse_time(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(value: str | None, now: datetime | None = None) -> str:
    """How long ago, as kubectl shows it: 45s, 12m, 3h, 5d."""
    if not value:
        return "-"
    seconds = max(((now or datetime.now(UTC)) - parse_time(value)).total_seconds(), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
