"""The CLI's shared pieces that are plain functions: the API URL a user may give, listings
fitted to a width, id prefixes, ages."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from rich.console import Console

from cli.client import api_root
from cli.kit import Column, age, by_id_prefix, listing, short_ids


@pytest.mark.parametrize(
    "given",
    [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8080/",
        "http://127.0.0.1:8080/api/v1",
        "http://127.0.0.1:8080/api/v1/",
        "127.0.0.1:8080",
        " http://127.0.0.1:8080/api/v1 ",
    ],
)
def test_every_form_of_the_api_url_names_the_same_root(given: str) -> None:
    assert api_root(given) == "http://127.0.0.1:8080"


def test_a_root_under_a_path_keeps_its_path() -> None:
    assert api_root("https://nest.example/tenant-a/api/v1") == "https://nest.example/tenant-a"


def render(columns: list[Column], rows: list[list[str]], width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, markup=False, highlight=False).print(
        listing(columns, rows, width=width)
    )
    return out.getvalue().splitlines()


COLUMNS = [
    Column("NAME"),
    Column("ID"),
    Column("PHASE"),
    Column("VERSION", priority=2),
    Column("ENDPOINT", priority=1),
    Column("CREATED", priority=3),
]
ROWS = [
    [
        "payments-production-eu-west-01",
        "d0da63fb",
        "Provisioning",
        "1.37.2",
        "10.0.0.1:6443",
        "2026-12-05 03:31:55",
    ],
    ["demo", "1368672d", "Pending", "1.37.2", "-", "2026-12-05 03:31:56"],
]


def test_a_wide_terminal_shows_every_column_on_one_line_per_row() -> None:
    lines = render(COLUMNS, ROWS, 200)
    assert lines[0].split() == ["NAME", "ID", "PHASE", "VERSION", "ENDPOINT", "CREATED"]
    assert len(lines) == 3
    assert "2026-12-05 03:31:55" in lines[1]


@pytest.mark.parametrize(
    ("width", "shown"),
    [
        (100, ["NAME", "ID", "PHASE", "VERSION", "ENDPOINT", "CREATED"]),
        (80, ["NAME", "ID", "PHASE", "VERSION", "ENDPOINT"]),
        (70, ["NAME", "ID", "PHASE", "ENDPOINT"]),
        (60, ["NAME", "ID", "PHASE"]),
    ],
)
def test_a_narrow_terminal_drops_the_least_important_columns_first(
    width: int, shown: list[str]
) -> None:
    lines = render(COLUMNS, ROWS, width)
    assert all(len(line.rstrip()) <= width for line in lines)
    assert lines[0].split() == shown
    assert len(lines) == 3  # nothing wraps
    for row, line in zip(ROWS, lines[1:], strict=True):
        assert line.split()[:3] == row[:3]  # name, id, phase: whole


def test_free_text_wraps_within_its_column_and_keeps_every_word() -> None:
    columns = [Column("TYPE"), Column("STATUS"), Column("MESSAGE", priority=1, wrap=True)]
    message = "no management cluster configured: set NEST_KUBECONFIG, or run Nest inside it"
    lines = render(columns, [["ManagementClusterAvailable", "False", message]], 60)
    assert all(len(line.rstrip()) <= 60 for line in lines)
    assert (
        " ".join(" ".join(line.split()) for line in lines[1:]).replace(
            "ManagementClusterAvailable False ", ""
        )
        == message
    )


def test_cells_are_never_read_as_markup() -> None:
    lines = render([Column("NAME")], [["[bold]x[/bold] :smile: [a-z0-9]"]], 80)
    assert lines[1].rstrip() == "[bold]x[/bold] :smile: [a-z0-9]"


def test_id_prefixes_are_as_long_as_needed_to_tell_ids_apart() -> None:
    assert short_ids(["d0da63fb-0000", "1368672d-0000"]) == 8
    assert short_ids(["d0da63fb-a000", "d0da63fb-b000"]) == 10
    assert short_ids([]) == 8


def test_an_id_prefix_finds_one_item_or_says_it_is_ambiguous() -> None:
    items = [{"id": "d0da63fb-a000"}, {"id": "d0da63fb-b000"}, {"id": "1368672d-0000"}]
    assert by_id_prefix(items, "1368", "cluster") == items[2]
    assert by_id_prefix(items, "136", "cluster") is None  # too short to be meant as an id
    assert by_id_prefix(items, "ffff", "cluster") is None
    with pytest.raises(Exception, match="several cluster ids"):
        by_id_prefix(items, "d0da63fb", "cluster")


def test_ages_read_as_kubectl_shows_them() -> None:
    now = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)
    assert age("2026-12-05T11:59:15Z", now) == "45s"
    assert age("2026-12-05T11:48:00Z", now) == "12m"
    assert age("2026-12-05T10:30:00+00:00", now) == "90m"
    assert age("2026-12-05T07:00:00Z", now) == "5h"
    assert age("2026-11-30T12:00:00Z", now) == "5d"
    assert age(None, now) == "-"
