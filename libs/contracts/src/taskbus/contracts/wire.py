"""The JSON view served to clients, shaped like OpenHands' events where one exists.

Actions get `action` + `args`, observations `observation` + `content` + `extras`; every event keeps
Taskbus' `kind` too, so nothing is lost for clients that know it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from taskbus.contracts.events import EVENT_TYPES

_ENVELOPE = ("id", "kind", "conversation_id", "timestamp", "source", "cause")


def to_wire(stored: bytes | msgspec.Raw) -> dict[str, Any]:
    """Map one stored event (its JSON bytes) to the client view; unknown kinds pass through."""
    data: dict[str, Any] = msgspec.json.decode(stored)
    event_type = EVENT_TYPES.get(data.get("kind", ""))
    if event_type is None:
        return data
    view = {key: data[key] for key in _ENVELOPE if key in data}
    payload = {key: value for key, value in data.items() if key not in _ENVELOPE}
    if event_type.openhands_action is not None:
        view["action"] = event_type.openhands_action
        view["message"] = payload.get("content") or payload.get("thought") or ""
        view["args"] = payload
    elif event_type.openhands_observation is not None:
        view["observation"] = event_type.openhands_observation
        view["content"] = payload.pop("content", "")
        view["message"] = payload.get("reason") or view["content"][:200]
        view["extras"] = payload
    else:
        view.update(payload)
    return view
