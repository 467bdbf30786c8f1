"""The OpenAPI schema of an event as clients receive it (`taskbus.contracts.wire.to_wire`): one
schema per kind, built from the event types and wire's OpenHands mapping, under a `oneOf`
keyed on `kind`. Each names what the wire view always carries and lets the Taskbus fields that
stay at the top level through (`additionalProperties`), listing them by name."""

from __future__ import annotations

from typing import Any

import msgspec

from taskbus.contracts.events import EVENT_TYPES, Event, EventSource
from taskbus.contracts.wire import NULL_OBSERVATION, OPENHANDS_FIELDS, stays_top_level, wire_name

EVENT_SCHEMA = "Event"
_REF = "#/components/schemas/{name}"

_ENVELOPE: dict[str, dict[str, Any]] = {
    "id": {"type": "integer", "minimum": 0, "description": "Dense per conversation, from 0."},
    "conversation_id": {"type": "string", "description": "The conversation it belongs to."},
    "timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "When it was appended (UTC, RFC 3339).",
    },
    "source": {
        "enum": [source.value for source in EventSource],
        "description": "Who caused it: the user, the agent, or the environment (services).",
    },
    "cause": {
        "anyOf": [{"type": "integer"}, {"type": "null"}],
        "description": "Id of the event this one answers (an observation's action), if any.",
    },
}
_MESSAGE = {"type": "string", "description": "One line for a reader (OpenHands' `message`)."}


def _kind_schema(kind: str, event_type: type[Event]) -> dict[str, Any]:
    own = [
        field.name for field in msgspec.structs.fields(event_type) if field.name not in _ENVELOPE
    ]
    mapped = OPENHANDS_FIELDS.get(kind, {})
    properties: dict[str, Any] = {
        "kind": {"const": kind, "description": "The event's type: selects this schema."},
        **_ENVELOPE,
        "message": _MESSAGE,
    }
    openhands_names = ", ".join(f"`{name}`" for name in mapped.values()) or "none"
    if event_type.openhands_action is not None:
        properties["action"] = {
            "const": event_type.openhands_action,
            "description": "OpenHands' action name: `event_from_dict` builds its action class.",
        }
        properties["args"] = {
            "type": "object",
            "description": f"The fields OpenHands' action takes: {openhands_names}.",
        }
        carried = ["action", "args"]
    else:
        observation = event_type.openhands_observation or NULL_OBSERVATION
        properties["observation"] = {
            "const": observation,
            "description": "OpenHands' observation name (`null`: OpenHands has no class for "
            "this kind and skips it).",
        }
        properties["content"] = {
            "type": "string",
            "description": "The observation's text, or a one-line summary of the event.",
        }
        properties["extras"] = {
            "type": "object",
            "description": f"The fields OpenHands' observation takes: {openhands_names}.",
        }
        carried = ["observation", "content", "extras"]
    top_level = [wire_name(name) for name in own if stays_top_level(kind, name)]
    doc = " ".join((event_type.__doc__ or kind).strip().split("\n\n")[0].split())
    listed = ", ".join(f"`{name}`" for name in top_level) or "none"
    return {
        "type": "object",
        "title": kind,
        "description": f"{doc} Taskbus' own fields, at the top level: {listed}.",
        "properties": properties,
        "required": ["kind", *(name for name in _ENVELOPE if name != "cause"), "message", *carried],
        "additionalProperties": True,
    }


def event_components() -> dict[str, Any]:
    """The per-kind schemas and `Event`, their union keyed on `kind`."""
    components = {kind: _kind_schema(kind, event_type) for kind, event_type in EVENT_TYPES.items()}
    mapping = {kind: _REF.format(name=kind) for kind in EVENT_TYPES}
    components[EVENT_SCHEMA] = {
        "description": "An event: the wire view of one fact of the conversation (see "
        "docs/websocket.md), readable by OpenHands' `event_from_dict`.",
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "kind", "mapping": mapping},
    }
    return components
