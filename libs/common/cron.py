"""Schedules: a small, exact 5-field cron parser and the run plan, as pure functions.

Shared by the API (which validates the schedules users write) and the backup service (which
runs them); nothing here touches I/O.

Syntax (Vixie cron): `minute hour day-of-month month day-of-week`, each field a comma list of
`*`, `N`, `N-M`, with an optional `/step`; month and weekday names (`jan`, `mon`); weekday 0 or 7
is Sunday; the macros `@hourly`, `@daily`/`@midnight`, `@weekly`, `@monthly`, `@yearly`/
`@annually`. As in cron, when both day-of-month and day-of-week are restricted, a day matching
either one fires. Times are UTC (no daylight-saving gaps or repeats to reason about).

`plan_run(schedule, last_run, now)` implements the catch-up rule: however many runs were missed
while Nest was down, exactly one catch-up run happens at the next start.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_RANGES = {
    "minute": (0, 59),
    "hour": (0, 23),
    "day-of-month": (1, 31),
    "month": (1, 12),
    "day-of-week": (0, 7),
}
_NAMES = {
    "month": {
        name: number
        for number, name in enumerate(
            ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
            start=1,
        )
    },
    "day-of-week": {
        name: number
        for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
    },
}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
SEARCH_YEARS = 12
"""A schedule that does not fire within this many years never fires (e.g. `0 0 30 2 *`)."""
MAX_MISSED_COUNTED = 10_000


class CronError(ValueError):
    """A cron expression is malformed; the message names the field and the bad part."""

    def __init__(self, expression: str, field: str | None, problem: str) -> None:
        where = f"{field} field" if field else "expression"
        super().__init__(f"invalid cron expression {expression!r}: {where}: {problem}")
        self.expression = expression
        self.field = field


def _value(text: str, field: str, expression: str) -> int:
    low, high = _RANGES[field]
    names = _NAMES.get(field, {})
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise CronError(
            expression,
            field,
            f"{text!r} is not a number" + (f" or a name ({', '.join(names)})" if names else ""),
        )
    number = int(text)
    if not low <= number <= high:
        raise CronError(expression, field, f"{number} is out of range {low}-{high}")
    return number


def _parse_field(text: str, field: str, expression: str) -> frozenset[int]:
    low, high = _RANGES[field]
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(expression, field, "empty list element")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(expression, field, f"step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = _value(first, field, expression), _value(last, field, expression)
            if start > end:
                raise CronError(expression, field, f"range {base!r} runs backwards")
        else:
            start = _value(base, field, expression)
            end = high if slash else start
        values.update(range(start, end + 1, step))
    if field == "day-of-week" and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression; `next_after(t)` is the first firing strictly after `t`."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """0 = Sunday, as in cron."""
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        text = _MACROS.get(expression.strip().lower(), expression.strip())
        parts = text.split()
        if len(parts) != 5:
            raise CronError(
                expression,
                None,
                f"expected 5 fields ({' '.join(FIELDS)}) or a macro, got {len(parts)}",
            )
        minutes, hours, days, months, weekdays = (
            _parse_field(part, field, expression) for part, field in zip(parts, FIELDS, strict=True)
        )
        schedule = cls(
            expression=expression,
            minutes=minutes,
            hours=hours,
            days=days,
            months=months,
            weekdays=weekdays,
            days_restricted=not parts[2].startswith("*"),
            weekdays_restricted=not parts[4].startswith("*"),
        )
        schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # refuses one that never fires
        return schedule

    def _day_matches(self, moment: datetime) -> bool:
        in_month = moment.day in self.days
        in_week = (moment.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_month or in_week
        return in_month and in_week

    def next_after(self, moment: datetime) -> datetime:
        """The first firing time strictly after `moment` (an aware datetime), in UTC."""
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        start = moment.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        candidate = start
        limit = start + timedelta(days=366 * SEARCH_YEARS)
        while candidate < limit:
            if candidate.month not in self.months:
                year, month = divmod(candidate.month, 12)
                candidate = candidate.replace(
                    year=candidate.year + year, month=month + 1, day=1, hour=0, minute=0
                )
                continue
            if not self._day_matches(candidate):
                candidate = (candidate + timedelta(days=1)).replace(hour=0, minute=0)
                continue
            if candidate.hour not in self.hours:
                candidate = (candidate + timedelta(hours=1)).replace(minute=0)
                continue
            if candidate.minute not in self.minutes:
                later = [m for m in self.minutes if m > candidate.minute]
                if later:
                    candidate = candidate.replace(minute=min(later))
                else:
                    candidate = (candidate + timedelta(hours=1)).replace(minute=0)
                continue
            return candidate
        raise CronError(self.expression, None, f"never fires within {SEARCH_YEARS} years")

    def longest_interval(self) -> timedelta:
        """The longest time between two consecutive firings (see `longest_interval`)."""
        return longest_interval(self.expression)


INTERVAL_ANCHOR = datetime(2024, 1, 1, tzinfo=UTC)
"""Where `longest_interval` starts looking: a fixed leap year, so the answer never depends on
when it is asked."""
INTERVAL_HORIZON = timedelta(days=2 * 366)
INTERVAL_MAX_FIRINGS = 50_000


@functools.lru_cache(maxsize=256)
def longest_interval(expression: str) -> timedelta:
    """The longest gap between consecutive firings of `expression`.

    Every firing over two years from a fixed leap-year anchor is walked (up to 50,000
    firings: a schedule that fires that often has its longest gap well inside the window), and
    at least two firings always, so `0 0 29 2 *` gives its four years. Two years cover every
    month length, leap day and weekday combination a 5-field cron can distinguish except the
    century rule, which no backup policy will notice.
    """
    schedule = CronSchedule.parse(expression)
    previous = schedule.next_after(INTERVAL_ANCHOR - timedelta(minutes=1))
    longest = timedelta(0)
    for _ in range(INTERVAL_MAX_FIRINGS):
        following = schedule.next_after(previous)
        longest = max(longest, following - previous)
        if following - INTERVAL_ANCHOR >= INTERVAL_HORIZON:
            break
        previous = following
    return longest


@dataclass(frozen=True)
class RunPlan:
    """What a scheduler should do now."""

    run_now: bool
    """A run is due (on time, or one catch-up run for everything missed)."""
    missed: int
    """Firing times that passed since the last run (capped); >1 means runs were skipped."""
    next_at: datetime
    """When to look again if nothing runs now (or after this run)."""


def plan_run(schedule: CronSchedule, last_run: datetime | None, now: datetime) -> RunPlan:
    """Decide whether to run at `now` given the last run's scheduled time.

    A new schedule (`last_run` None) waits for its first firing time. Missed runs collapse
    into one: whether one or a thousand firing times passed, `run_now` is True once and the
    next firing time is computed from `now`.
    """
    if last_run is None:
        return RunPlan(run_now=False, missed=0, next_at=schedule.next_after(now))
    due = schedule.next_after(last_run)
    if due > now:
        return RunPlan(run_now=False, missed=0, next_at=due)
    missed = 0
    cursor = due
    while cursor <= now and missed < MAX_MISSED_COUNTED:
        missed += 1
        cursor = schedule.next_after(cursor)
    return RunPlan(run_now=True, missed=missed, next_at=schedule.next_after(now))


def latest_due(schedule: CronSchedule, last_run: datetime | None, now: datetime) -> datetime | None:
    """The scheduled time a run started at `now` stands for (the newest passed firing time),
    which the caller records as `last_run`; None when nothing is due."""
    if last_run is None or schedule.next_after(last_run) > now:
        return None
    cursor = schedule.next_after(last_run)
    count = 0
    while count < MAX_MISSED_COUNTED:
        following = schedule.next_after(cursor)
        if following > now:
            return cursor
        cursor = following
        count += 1
    return now.astimezone(UTC).replace(second=0, microsecond=0)
