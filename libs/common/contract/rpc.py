"""Request/reply methods: a subject with the models of its request and of its answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from libs.common.contract.base import WireModel

Req = TypeVar("Req", bound=WireModel)
Resp = TypeVar("Resp", bound=WireModel)


@dataclass(frozen=True)
class RpcMethod(Generic[Req, Resp]):
    """One request/reply method on core NATS (`nest.rpc.<service>.<method>`): `Bus.call` asks
    it with a `request` model and gets a `response` model back; `Bus.answer` serves it."""

    subject: str
    request: type[Req]
    response: type[Resp]
    summary: str
