"""Typed message handlers: one handler per payload type, each with its declared ack outcome.

A service registers its handlers on a `Router` (FastStream's way): the payload type it takes,
the async function that handles it, and what happens when that function fails:

    router = Router("provisioner")
    router.register(ReconcileCluster, service.on_reconcile, ack=AckPolicy.NACK_ON_ERROR)
    bus.subscribe(spec, router)

The handler gets the validated payload (and, if it takes a second argument, the `Delivery`),
never an envelope or a dict. After it returns the message is acked; when it raises:

- `AckPolicy.NACK_ON_ERROR`: the failure is transient: nak with backoff, and after the
  consumer's `max_deliver` deliveries the message goes to the DLQ with the error;
- `AckPolicy.REJECT_ON_ERROR`: the failure is permanent: the message goes to the DLQ at once;
- `AckPolicy.ACK_ON_ERROR`: the failure is logged and the message acked (the handler already
  reported the failure where users see it; a redelivery would only repeat it).

Under every policy a handler raises `Reject` for a message that can never succeed (DLQ at
once), and a payload that does not validate is dead-lettered without calling the handler.

A consumer that applies many messages in one transaction (the API's projector) registers a
`BatchHandler` instead: it gets every message of a fetch, in stream order, as `Received`
(typed payload and delivery), and its outcome, declared the same way, holds for the whole batch. A
message whose type has no handler is dead-lettered (`unknown=Unknown.REJECT`, for a service's
own intents) or acked unseen (`Unknown.IGNORE`, for a consumer of other services' events, which
also skips a payload of a newer, additive version that does not validate here).
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from pydantic import ValidationError

from libs.common.contract import BY_PAYLOAD, BY_TYPE, Envelope, UnknownMessageType
from libs.common.contract.base import WireModel

log = logging.getLogger(__name__)

P = TypeVar("P", bound=WireModel)


class Reject(Exception):
    """Raised by a handler for a message that can never succeed: it goes to the DLQ at once."""


@dataclass(frozen=True)
class Delivery:
    """What a handler knows about the message it is handling, besides its payload."""

    subject: str
    stream_sequence: int
    num_delivered: int
    envelope: Envelope | None = None
    """The message's envelope (id, source, time, correlation id)."""


class AckPolicy(enum.Enum):
    """What the consumer does with a message whose handler raised (it always acks one whose
    handler returned)."""

    NACK_ON_ERROR = "nack-on-error"
    """Transient: nak with backoff; after `max_deliver` deliveries, to the DLQ."""
    REJECT_ON_ERROR = "reject-on-error"
    """Permanent: to the DLQ at once."""
    ACK_ON_ERROR = "ack-on-error"
    """Reported by the handler itself: log it and ack."""


class Unknown(enum.Enum):
    """What a router does with a message of a type it has no handler for."""

    REJECT = "reject"
    """Dead-letter it: the consumer's subjects carry only types it must handle."""
    IGNORE = "ignore"
    """Ack it unseen: the subjects carry other consumers' types too, or newer ones; a payload
    that does not validate is acked too (a newer producer's additive change), with a warning."""


class Outcome(enum.Enum):
    """What the consumer does with a handled message."""

    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class Decision:
    """The outcome of handling one message, with the failure behind a retry or a dead letter."""

    outcome: Outcome
    error: str = ""
    """What went wrong, one line (it goes into the dead letter's headers)."""
    exception: BaseException | None = None


ACK = Decision(Outcome.ACK)

Dispatch = Callable[[Envelope, Delivery], Awaitable[Decision]]
"""Handles one message and says what to do with it: what a consumer runs per message."""

LegacyHandler = Callable[[Envelope, Delivery], Awaitable[object]]
"""The older handler shape: an envelope in, an exception out (kept until every consumer moved
onto a `Router`)."""


def _failed(outcome: Outcome, exc: BaseException) -> Decision:
    return Decision(outcome, f"{type(exc).__name__}: {exc}", exc)


def _on_failure(ack: AckPolicy, exc: Exception, what: str) -> Decision:
    """The outcome of a handler that raised `exc`, as its `ack` policy declares."""
    if isinstance(exc, Reject):
        return _failed(Outcome.DEAD_LETTER, exc)
    if ack is AckPolicy.NACK_ON_ERROR:
        return _failed(Outcome.RETRY, exc)
    if ack is AckPolicy.REJECT_ON_ERROR:
        return _failed(Outcome.DEAD_LETTER, exc)
    log.error("%s failed; acked as declared", what, exc_info=exc)
    return ACK


@dataclass(frozen=True)
class Route(Generic[P]):
    """One registered handler."""

    payload: type[P]
    handler: Callable[[P, Delivery], Awaitable[object]]
    ack: AckPolicy


class Router:
    """The handlers of one consumer, by payload type."""

    def __init__(
        self,
        name: str,
        *,
        unknown: Unknown = Unknown.REJECT,
        before: LegacyHandler | None = None,
    ) -> None:
        self.name = name
        self.unknown = unknown
        self.before = before
        """Run for every message before its handler (a failure there counts as transient)."""
        self._routes: dict[str, Route[Any]] = {}

    @overload
    def register(
        self,
        payload: type[P],
        handler: Callable[[P], Awaitable[object]],
        *,
        ack: AckPolicy,
    ) -> None: ...

    @overload
    def register(
        self,
        payload: type[P],
        handler: Callable[[P, Delivery], Awaitable[object]],
        *,
        ack: AckPolicy,
    ) -> None: ...

    def register(
        self, payload: type[P], handler: Callable[..., Awaitable[object]], *, ack: AckPolicy
    ) -> None:
        """Handle messages carrying `payload` with `handler`, failing as `ack` declares."""
        entry = BY_PAYLOAD.get(payload)
        if entry is None:
            raise UnknownMessageType(f"{payload.__name__} is not part of the event contract")
        if entry.type in self._routes:
            raise ValueError(f"{self.name}: {payload.__name__} already has a handler")
        self._routes[entry.type] = Route(payload, _with_delivery(handler), ack)

    def handles(self) -> dict[str, AckPolicy]:
        """Message type -> the ack policy of its handler (for docs and tests)."""
        return {type_: route.ack for type_, route in self._routes.items()}

    async def dispatch(self, envelope: Envelope, delivery: Delivery) -> Decision:
        """Validate the payload, run its handler and decide the message's outcome."""
        if self.before is not None:
            try:
                await self.before(envelope, delivery)
            except Reject as exc:
                return _failed(Outcome.DEAD_LETTER, exc)
            except Exception as exc:
                log.warning("%s: %s failed before handling: %s", self.name, envelope.type, exc)
                return _failed(Outcome.RETRY, exc)
        route = self._routes.get(envelope.type)
        if route is None:
            if self.unknown is Unknown.IGNORE:
                return ACK
            known = "unknown type" if envelope.type not in BY_TYPE else "no handler for type"
            return Decision(Outcome.DEAD_LETTER, f"{self.name}: {known} {envelope.type!r}")
        try:
            payload = route.payload.model_validate(envelope.data)
        except ValidationError as exc:
            if self.unknown is Unknown.IGNORE:
                log.warning("%s: ignoring an invalid %s: %s", self.name, envelope.type, exc)
                return ACK
            return _failed(Outcome.DEAD_LETTER, exc)
        try:
            await route.handler(payload, delivery)
        except Exception as exc:
            return _on_failure(route.ack, exc, f"{self.name}: the handler of {envelope.type}")
        return ACK


def _with_delivery(
    handler: Callable[..., Awaitable[object]],
) -> Callable[[Any, Delivery], Awaitable[object]]:
    """`handler` called as (payload, delivery), whether it takes the delivery or not."""
    parameters = [
        p
        for p in inspect.signature(handler).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(parameters) >= 2:
        return handler

    async def payload_only(payload: Any, _: Delivery) -> None:
        await handler(payload)

    return payload_only


def legacy_dispatch(handler: LegacyHandler) -> Dispatch:
    """A `LegacyHandler` under the old global rule: `Reject`, an unknown type or an invalid
    payload go to the DLQ at once, any other failure is retried."""

    async def dispatch(envelope: Envelope, delivery: Delivery) -> Decision:
        try:
            await handler(envelope, delivery)
        except (Reject, UnknownMessageType, ValidationError) as exc:
            return _failed(Outcome.DEAD_LETTER, exc)
        except Exception as exc:
            return _failed(Outcome.RETRY, exc)
        return ACK

    return dispatch


@dataclass(frozen=True)
class Received:
    """One message of a batch: its validated payload and its delivery."""

    payload: WireModel
    delivery: Delivery


class BatchHandler:
    """One handler for every message of a fetch, in stream order (one transaction for many
    messages); its `ack` policy decides the outcome of the whole batch."""

    def __init__(
        self,
        name: str,
        handler: Callable[[list[Received]], Awaitable[object]],
        *,
        ack: AckPolicy,
        types: Iterable[type[WireModel]] | None = None,
        unknown: Unknown = Unknown.IGNORE,
    ) -> None:
        self.name = name
        self.handler = handler
        self.ack = ack
        self.unknown = unknown
        self.types: frozenset[str] | None = None
        """The message types handed to `handler` (None: every type of the contract)."""
        if types is not None:
            entries = [BY_PAYLOAD.get(payload) for payload in types]
            if any(entry is None for entry in entries):
                raise UnknownMessageType(f"{name}: a batch type is not part of the event contract")
            self.types = frozenset(entry.type for entry in entries if entry is not None)

    def _unknown(self, envelope: Envelope, error: str) -> Decision:
        if self.unknown is Unknown.IGNORE:
            return ACK
        return Decision(Outcome.DEAD_LETTER, f"{self.name}: {error} {envelope.type!r}")

    async def dispatch_batch(self, messages: list[tuple[Envelope, Delivery]]) -> list[Decision]:
        """The outcome of each message: those the handler took share the batch's outcome."""
        decisions: list[Decision | None] = [None] * len(messages)
        taken: list[tuple[int, Received]] = []
        for index, (envelope, delivery) in enumerate(messages):
            entry = BY_TYPE.get(envelope.type)
            if entry is None or (self.types is not None and entry.type not in self.types):
                decisions[index] = self._unknown(envelope, "no handler for type")
                continue
            try:
                payload = entry.payload.model_validate(envelope.data)
            except ValidationError as exc:
                if self.unknown is Unknown.IGNORE:
                    log.warning("%s: ignoring an invalid %s: %s", self.name, envelope.type, exc)
                    decisions[index] = ACK
                else:
                    decisions[index] = _failed(Outcome.DEAD_LETTER, exc)
                continue
            taken.append((index, Received(payload, delivery)))
        if taken:
            outcome = await self._run([received for _, received in taken])
            for index, _ in taken:
                decisions[index] = outcome
        return [decision or ACK for decision in decisions]

    async def _run(self, batch: list[Received]) -> Decision:
        try:
            await self.handler(batch)
        except Exception as exc:
            return _on_failure(self.ack, exc, f"{self.name}: a batch of {len(batch)}")
        return ACK
