"""Cron parsing and next-run computation (checked against croniter), and the catch-up rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.cron import CronError, CronSchedule, latest_due, plan_run

T0 = datetime(2026, 11, 21, 12, 34, 56, tzinfo=UTC)  # a Saturday


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("* * * * *", datetime(2026, 11, 21, 12, 35, tzinfo=UTC)),
        ("0 * * * *", datetime(2026, 11, 21, 13, 0, tzinfo=UTC)),
        ("@daily", datetime(2026, 11, 22, 0, 0, tzinfo=UTC)),
        ("30 2 * * mon-fri", datetime(2026, 11, 23, 2, 30, tzinfo=UTC)),
        ("0 0 1 jan *", datetime(2027, 1, 1, tzinfo=UTC)),
        ("0 0 29 2 *", datetime(2028, 2, 29, tzinfo=UTC)),
        ("*/15 9-17 * * *", datetime(2026, 11, 21, 12, 45, tzinfo=UTC)),
        ("*/15 13-17 * * *", datetime(2026, 11, 21, 13, 0, tzinfo=UTC)),
        ("*/15 2-3 * * *", datetime(2026, 11, 22, 2, 0, tzinfo=UTC)),
        # A one-value range is that value (croniter 7 reads `5-5` as `*`; we follow cron).
        ("40-40 * * * *", datetime(2026, 11, 21, 12, 40, tzinfo=UTC)),
        ("0 12 * * 7", datetime(2026, 11, 22, 12, 0, tzinfo=UTC)),
        # Both day fields restricted: either matches (the 1st, or any Friday).
        ("0 0 1 * fri", datetime(2026, 11, 27, tzinfo=UTC)),
    ],
)
def test_next_after(expression: str, expected: datetime) -> None:
    assert CronSchedule.parse(expression).next_after(T0) == expected


def test_next_after_is_strictly_later() -> None:
    schedule = CronSchedule.parse("0 * * * *")
    on_the_hour = datetime(2026, 1, 1, 5, 0, tzinfo=UTC)
    assert schedule.next_after(on_the_hour) == on_the_hour + timedelta(hours=1)


@pytest.mark.parametrize(
    ("expression", "field", "message"),
    [
        ("61 * * * *", "minute", "61 is out of range 0-59"),
        ("0 24 * * *", "hour", "24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month", "0 is out of range 1-31"),
        ("0 0 * 13 *", "month", "13 is out of range 1-12"),
        ("0 0 * foo *", "month", "'foo' is not a number or a name"),
        ("0 0 * * 8", "day-of-week", "8 is out of range 0-7"),
        ("*/0 * * * *", "minute", "step '0' must be a positive number"),
        ("5-1 * * * *", "minute", "runs backwards"),
        ("1,,2 * * * *", "minute", "empty list element"),
        ("* * * *", None, "expected 5 fields"),
        ("0 0 30 2 *", None, "never fires"),
    ],
)
def test_errors_name_the_field(expression: str, field: str | None, message: str) -> None:
    with pytest.raises(CronError, match=message) as caught:
        CronSchedule.parse(expression)
    assert caught.value.field == field
    if field:
        assert f"{field} field" in str(caught.value)


def _field(low: int, high: int, star_steps: bool = True) -> st.SearchStrategy[str]:
    number = st.integers(low, high)
    item = st.one_of(
        number.map(str),
        # croniter reads a one-value range `N-N` as `*`, so the oracle gets only real ranges.
        st.tuples(number, number)
        .filter(lambda p: p[0] != p[1])
        .map(lambda p: f"{min(p)}-{max(p)}"),
        st.integers(1, high).filter(lambda _: star_steps).map(lambda step: f"*/{step}"),
        st.tuples(number, number, st.integers(1, 10))
        .filter(lambda p: p[0] != p[1])
        .map(lambda p: f"{min(p[0], p[1])}-{max(p[0], p[1])}/{p[2]}"),
    )
    # `*` only on its own: croniter treats `1,*` as unrestricted, cron (and we) do not.
    return st.just("*") | st.lists(item, min_size=1, max_size=3).map(",".join)


# `*/N` in a day field: cron counts it as `*` for the either-day rule, croniter does not.
expressions = st.tuples(
    _field(0, 59), _field(0, 23), _field(1, 28, False), _field(1, 12), _field(0, 6, False)
).map(" ".join)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=100, deadline=None)
@given(expression=expressions, moment=moments)
def test_matches_croniter(expression: str, moment: datetime) -> None:
    ours = CronSchedule.parse(expression).next_after(moment)
    theirs = croniter(expression, moment).get_next(datetime)
    assert ours == theirs


def test_new_schedule_waits_for_its_first_time() -> None:
    result = plan_run(CronSchedule.parse("0 3 * * *"), None, T0)
    assert not result.run_now
    assert result.next_at == datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def test_on_time_run() -> None:
    schedule = CronSchedule.parse("0 * * * *")
    last = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert not plan_run(schedule, last, T0).run_now
    later = datetime(2026, 11, 21, 13, 0, 5, tzinfo=UTC)
    result = plan_run(schedule, last, later)
    assert (result.run_now, result.missed) == (True, 1)
    assert result.next_at == datetime(2026, 11, 21, 14, 0, tzinfo=UTC)


def test_missed_runs_while_down_collapse_into_one_catch_up() -> None:
    schedule = CronSchedule.parse("0 * * * *")
    last = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
    result = plan_run(schedule, last, T0)
    assert result.run_now
    assert result.missed == 72
    assert result.next_at == datetime(2026, 11, 21, 13, 0, tzinfo=UTC)
    # The caller records the newest passed firing time; then nothing more is due.
    recorded = latest_due(schedule, last, T0)
    assert recorded == datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert not plan_run(schedule, recorded, T0).run_now


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CronSchedule.parse("* * * * *").next_after(datetime(2026, 1, 1))
