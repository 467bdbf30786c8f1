"""The internal protocol as an AsyncAPI 3.0 document, built from the contracts themselves.

Every subject, message and schema comes from this package (`subjects`, the msgspec types and
`msgspec.json.schema_components`), so the description cannot drift from what the services
send. `taskbus asyncapi` prints it.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec

from taskbus.contracts import subjects
from taskbus.contracts.commands import AnyCommand
from taskbus.contracts.events import EVENT_TYPES
from taskbus.contracts.partitions import PARTITIONS
from taskbus.contracts.queries import Query, Reply

_SCHEMA_REF = "#/components/schemas/{name}"


def _messages(types: list[type[Any]]) -> dict[str, Any]:
    messages: dict[str, Any] = {}
    for t in types:
        message = {
            "name": t.__name__,
            "title": t.__name__,
            "contentType": "application/json",
            "payload": {"$ref": _SCHEMA_REF.format(name=t.__name__)},
        }
        if t.__doc__:  # the first paragraph of the type's own docstring
            message["summary"] = " ".join(t.__doc__.strip().split("\n\n")[0].split())
        messages[t.__name__] = message
    return messages


def _refs(types: list[type[Any]]) -> dict[str, Any]:
    return {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in types}


def _parameter(description: str, values: list[str] | None = None) -> dict[str, Any]:
    parameter: dict[str, Any] = {"description": description}
    if values is not None:
        parameter["enum"] = values
    return parameter


def asyncapi_document() -> dict[str, Any]:
    events = list(EVENT_TYPES.values())
    commands = list(typing.get_args(AnyCommand))
    queries = Query.__subclasses__()
    replies = Reply.__subclasses__()
    _, schemas = msgspec.json.schema_components(
        [*events, *commands, *queries, *replies], ref_template=_SCHEMA_REF
    )
    conversation = _parameter(f"the conversation's id ({subjects.CONVERSATION_ID_PATTERN.pattern})")
    partition = _parameter(
        f"the conversation's partition: FNV-1a of its id modulo {PARTITIONS}"
        " (contracts/partitions.py; NATS' own partition() mapping agrees)",
        [str(p) for p in range(PARTITIONS)],
    )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Taskbus internal protocol",
            "version": "1",
            "description": (
                f"Events are appended to JetStream stream {subjects.EVENTS_STREAM} with a dense"
                " id per conversation (Nats-Expected-Last-Subject-Sequence, Nats-Msg-Id ="
                f" <conversation>:<hash of the event without its id>); commands go to"
                " work-queue stream"
                f" {subjects.COMMANDS_STREAM}; queries are core NATS request-reply."
            ),
        },
        "channels": {
            "events": {
                "address": f"{subjects.EVENTS_PREFIX}.{{partition}}.{{conversationId}}.{{kind}}",
                "description": "The log: every fact of every conversation, in order.",
                "parameters": {
                    "partition": partition,
                    "conversationId": conversation,
                    "kind": _parameter("the event's kind", sorted(EVENT_TYPES)),
                },
                "messages": _refs(events),
            },
            "commands": {
                "address": f"{subjects.COMMANDS_PREFIX}.{subjects.SESSION_MANAGER}"
                ".{partition}.{command}",
                "description": (
                    "What the gateway asks of session-manager, on behalf of a user: a"
                    " conversation's commands on its partition (the instance holding it applies"
                    f" them), settings and secrets on `{subjects.USER_COMMANDS_TOKEN}` (any"
                    " instance applies them)."
                ),
                "parameters": {
                    "partition": _parameter(
                        "the conversation's partition, or the user commands' token",
                        [*partition["enum"], subjects.USER_COMMANDS_TOKEN],
                    ),
                    "command": _parameter("the command's name", [c.name() for c in commands]),
                },
                "messages": _refs(commands),
            },
            "queries": {
                "address": f"{subjects.QUERIES_PREFIX}.{{query}}",
                "description": "Read-model queries answered by event-store.",
                "parameters": {
                    "query": _parameter("the query's name", [q.subject_name for q in queries])
                },
                "messages": _refs(queries),
            },
            "replies": {
                "address": None,
                "description": "The reply inbox of a query request.",
                "messages": _refs(replies),
            },
        },
        "operations": {
            "appendEvent": {
                "action": "send",
                "channel": {"$ref": "#/channels/events"},
                "summary": "Every service appends the events it owns (docs/event-flow.md).",
            },
            "consumeEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/events"},
                "summary": "Durable consumers of session-manager, runtime-runner, event-store.",
            },
            "sendCommand": {"action": "send", "channel": {"$ref": "#/channels/commands"}},
            "handleCommand": {"action": "receive", "channel": {"$ref": "#/channels/commands"}},
            "askQuery": {
                "action": "send",
                "channel": {"$ref": "#/channels/queries"},
                "reply": {
                    "address": {"location": "$message.header#/reply_to"},
                    "channel": {"$ref": "#/channels/replies"},
                },
            },
        },
        "components": {
            "schemas": schemas,
            "messages": _messages([*events, *commands, *queries, *replies]),
        },
    }
