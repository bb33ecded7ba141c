"""The AsyncAPI 3 document of every intent and event, generated from the contract registry.

Nothing can be published outside `libs.common.contract.MESSAGES` (`envelope_for` refuses it),
and this document is built from that registry, so it lists every type that can appear on the bus.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from libs.common.contract import (
    DLQ_STREAM,
    EVENTS_STREAM,
    INTENTS_STREAM,
    MESSAGES,
    MessageType,
)

REF = "#/components/schemas/{model}"


def _message_name(entry: MessageType) -> str:
    # io.nest.cluster.status_changed.v1 -> cluster.status_changed.v1
    return entry.type.removeprefix("io.nest.")


def _envelope_schema(entry: MessageType) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "CloudEvents 1.0, structured JSON mode.",
        "required": ["specversion", "id", "source", "type", "time", "data"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {"type": "string", "description": "Unique; also the Nats-Msg-Id header."},
            "source": {"type": "string", "examples": ["/nest/api", "/nest/provisioner"]},
            "type": {"const": entry.type},
            "subject": {"type": "string", "description": "The resource id."},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"const": "application/json"},
            "correlationid": {
                "type": "string",
                "description": "The API request that caused this message.",
            },
            "data": {"$ref": REF.format(model=entry.payload.__name__)},
        },
    }


def build(version: str) -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(entry.payload, "validation") for entry in MESSAGES],
        by_alias=True,
        ref_template=REF,
    )
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for entry in MESSAGES:
        name = _message_name(entry)
        channel_id = entry.subject.replace(".", "_")
        messages[name] = {
            "name": entry.type,
            "title": entry.payload.__name__,
            "summary": entry.summary,
            "contentType": "application/cloudevents+json",
            "headers": {
                "type": "object",
                "properties": {"Nats-Msg-Id": {"type": "string", "description": "= id"}},
            },
            "payload": _envelope_schema(entry),
        }
        channel = channels.setdefault(
            channel_id,
            {
                "address": entry.subject,
                "description": (
                    f"Stream {INTENTS_STREAM} (work queue: exactly one service consumes)"
                    if entry.kind == "intent"
                    else f"Stream {EVENTS_STREAM} (limits retention: replayable)"
                ),
                "messages": {},
            },
        )
        channel["messages"][name] = {"$ref": f"#/components/messages/{name}"}
        operations[f"{'send' if entry.kind == 'intent' else 'receive'}_{channel_id}"] = {
            "action": "send" if entry.kind == "intent" else "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": entry.summary,
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{name}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Nest events and intents",
            "version": version,
            "description": (
                "Intents go to `nest.intent.<service>.<verb>` on stream "
                f"{INTENTS_STREAM}; events to `nest.event.<domain>.<name>` on {EVENTS_STREAM}. "
                f"Messages a consumer gives up on go to `nest.dlq.<service>` on {DLQ_STREAM} "
                "with the error in the `Nest-Error` header. The contract changes additively only."
            ),
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "nats": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The NATS JetStream server (NEST_NATS_URL).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
