"""Live fan-out of recorded events to Server-Sent Events streams.

One broadcaster per process tails the event history (woken after each commit that recorded
events, polling as a backstop for events other API replicas recorded) and offers each event to
every subscriber's bounded queue. With no subscriber it reads nothing: the first one to come
moves its position to the newest event (`refresh`), and wakes it. Subscribers hold no DB
session and no NATS consumer. One that falls behind by a full queue is dropped and told to
resume with Last-Event-ID; the others never wait.

Positions become visible in order (see repository.lock_for_append), the broadcaster emits them in
order, and a new subscriber registers and reads the broadcaster's position in one step, so replay
(position <= that head) and live (position > head) meet without a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from services.api.events import repository
from services.api.events.filters import EventFilter
from services.api.kit.db import Database

log = logging.getLogger(__name__)

BATCH = 500
CLOSING_NOTES = {
    "lagging": "lagging behind; reconnect with Last-Event-ID",
    "unauthorized": "the token is no longer valid",
}
RETRY_MILLISECONDS = 2000
"""Sent as `retry:`: how long an EventSource waits before it reconnects."""


@dataclass(frozen=True)
class StreamedEvent:
    """An event ready to send: its SSE frame is built once and shared by every subscriber."""

    position: int
    type: str
    subject: str | None
    frame: bytes


def sse_frame(
    position: int, event_type: str, subject: str | None, envelope: dict[str, Any]
) -> StreamedEvent:
    data = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
    frame = f"id: {position}\nevent: {event_type}\ndata: {data}\n\n".encode()
    return StreamedEvent(position, event_type, subject, frame)


@dataclass(eq=False)
class Subscriber:
    """One stream's bounded queue; `dropped` is set when it fell behind or the feed closed."""

    where: EventFilter
    queue: asyncio.Queue[StreamedEvent | None]
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""

    def offer(self, event: StreamedEvent) -> bool:
        """Queue the event if this subscriber wants it; False when the queue is full."""
        if not self.where.accepts(event.type, event.subject):
            return True
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    def drop(self, reason: str) -> None:
        self.reason = reason
        self.dropped.set()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


class Broadcaster:
    """Tails the event history and fans each new event out to the subscribers."""

    def __init__(
        self,
        db: Database,
        *,
        queue_size: int = 1000,
        poll_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self._behind = False
        self.queue_size = queue_size
        self.poll_seconds = poll_seconds
        self.position: int | None = None
        self.subscribers: set[Subscriber] = set()
        self.dropped = 0
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()

    def notify(self) -> None:
        """Called after an event commits: look for new rows now."""
        self._wake.set()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    def subscribe(self, where: EventFilter) -> tuple[Subscriber, int]:
        """Register a subscriber; returns it with the head position: every later event goes to
        its queue, every event up to the head is the caller's to replay from the history."""
        if self.position is None:
            raise RuntimeError("the broadcaster has not started")
        subscriber = Subscriber(where, asyncio.Queue(self.queue_size))
        self.subscribers.add(subscriber)
        self._wake.set()
        return subscriber, self.position

    async def refresh(self) -> None:
        """With nobody subscribed nothing was read: move to the newest event first."""
        if self._behind and not self.subscribers:
            async with self.db.session() as session:
                newest = await repository.last_position(session)
            if not self.subscribers:
                self.position = max(self.position or 0, newest)
                self._behind = False

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def publish(self, events: Sequence[StreamedEvent]) -> None:
        """Offer events (in position order) to everyone; never awaits, so nobody waits."""
        for event in events:
            for subscriber in list(self.subscribers):
                if not subscriber.offer(event):
                    self.subscribers.discard(subscriber)
                    self.dropped += 1
                    subscriber.drop("lagging")
            self.position = event.position

    async def pump(self) -> int:
        """Fan out everything recorded since the last pump; returns how many events."""
        total = 0
        while True:
            assert self.position is not None
            async with self.db.session() as session:
                rows = await repository.after(session, self.position, BATCH)
            events = [sse_frame(*row) for row in rows]
            if not events:
                return total
            self.publish(events)
            total += len(events)

    async def run(self) -> None:
        """Fan out forever; at cancellation every open stream is ended cleanly."""
        try:
            while self.position is None:
                try:
                    async with self.db.session() as session:
                        self.position = await repository.last_position(session)
                except Exception:
                    log.exception("event broadcaster cannot read the history; retrying")
                    await asyncio.sleep(1.0)
            self._ready.set()
            while True:
                self._wake.clear()
                try:
                    if self.subscribers:
                        await self.pump()
                    else:
                        self._behind = True
                except Exception:
                    log.exception("event broadcaster failed to read new events; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
        finally:
            for subscriber in list(self.subscribers):
                subscriber.drop("shutdown")
            self.subscribers.clear()


ReplayPage = Callable[[EventFilter, int, int], Awaitable[Sequence[StreamedEvent]]]
"""(filter, after, upto) -> the next matching events from the history, oldest first."""

StillAuthorized = Callable[[], Awaitable[bool]]
"""Whether the stream's token is still valid (not revoked, not expired)."""


class EventStreamResponse(Response):
    """An ASGI response streaming events as `text/event-stream`.

    Replays the history after `after` (None: start at the live head), then streams live events,
    with a comment line every `heartbeat` seconds. Ends when the client goes away, when it lags
    (the client reconnects with Last-Event-ID), when its token stops being valid (checked every
    `heartbeat` seconds), or when the app shuts down.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        replay: ReplayPage,
        where: EventFilter,
        *,
        after: int | None,
        heartbeat: float,
        authorized: StillAuthorized | None = None,
        write_timeout: float = 30.0,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.broadcaster = broadcaster
        self.replay = replay
        self.where = where
        self.after = after
        self.heartbeat = heartbeat
        self.authorized = authorized
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber, head = self.broadcaster.subscribe(self.where)
        try:
            streaming = asyncio.create_task(self._stream(subscriber, head, send))
            listening = asyncio.create_task(self._until_disconnect(receive))
            dropped = asyncio.create_task(subscriber.dropped.wait())
            tasks = {streaming, listening, dropped}
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if dropped in done and streaming not in done:
                # A lagging stream is usually blocked writing to a slow client: give it a moment
                # to end cleanly, then abandon it (the server closes the connection).
                await asyncio.wait({streaming}, timeout=1.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if streaming.done() and not streaming.cancelled():
                error = streaming.exception()
                if error is not None:
                    log.warning("event stream ended with an error: %s", error)
        finally:
            self.broadcaster.unsubscribe(subscriber)

    async def _until_disconnect(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _write(self, send: Send, body: bytes, *, more: bool = True) -> None:
        async with asyncio.timeout(self.write_timeout):
            await send({"type": "http.response.body", "body": body, "more_body": more})

    async def _stream(self, subscriber: Subscriber, head: int, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        await self._write(send, f"retry: {RETRY_MILLISECONDS}\n: stream open\n\n".encode())
        last = head if self.after is None else self.after
        while last < head:
            events = await self.replay(self.where, last, head)
            if not events:
                break
            await self._write(send, b"".join(e.frame for e in events))
            last = events[-1].position
        queue = subscriber.queue
        loop = asyncio.get_running_loop()
        check_at = loop.time() + self.heartbeat
        while not subscriber.dropped.is_set():
            if self.authorized is not None and loop.time() >= check_at:
                check_at = loop.time() + self.heartbeat
                if not await self.authorized():
                    subscriber.reason = "unauthorized"
                    break
            if queue.empty():
                try:
                    async with asyncio.timeout(self.heartbeat):
                        first = await queue.get()
                except TimeoutError:
                    await self._write(send, b": heartbeat\n\n")
                    continue
            else:
                first = queue.get_nowait()
            batch = [first]
            while not queue.empty() and len(batch) < 256:
                batch.append(queue.get_nowait())
            frames = [e.frame for e in batch if e is not None and e.position > last]
            if frames:
                await self._write(send, b"".join(frames))
                last = max(e.position for e in batch if e is not None)
        note = CLOSING_NOTES.get(subscriber.reason)
        closing = f": {note}\n\n".encode() if note else b""
        await self._write(send, closing, more=False)
