"""The JSON view served to clients: every event readable by OpenHands' `event_from_dict`
(openhands/events/serialization/event.py, V0 0.56.0), and by Taskbus clients through `kind`.

- An event OpenHands has a class for gets `action` + `args`, or `observation` + `content` +
  `extras`, holding exactly the fields that class takes (under OpenHands' names).
- Every other event (status, runtime, metrics, confirmation bookkeeping) is OpenHands' no-op
  observation `null`, whose content is a one-line summary; OpenHands clients skip it.
- Whatever OpenHands has no field for stays at the top level under Taskbus' name, with the
  envelope and `kind`, where `event_from_dict` ignores it. So nothing is lost for either client.
"""

from __future__ import annotations

from typing import Any

import msgspec

from taskbus.contracts.events import EVENT_TYPES

_ENVELOPE = ("id", "kind", "conversation_id", "timestamp", "source", "cause")
# OpenHands' no-op observation (NullObservation): for events it has no class for.
NULL_OBSERVATION = "null"

# kind -> {Taskbus field: OpenHands field} for the fields OpenHands' class of that name takes
# (its dataclass fields at 0.56.0); `content` of an observation is its top-level `content`.
OPENHANDS_FIELDS: dict[str, dict[str, str]] = {
    "MessageAction": {f: f for f in ("content", "image_urls", "wait_for_response")},
    # A command's timeout is a top-level `timeout` in OpenHands (set_hard_timeout).
    "CmdRunAction": {f: f for f in ("command", "is_input", "blocking", "cwd", "thought")},
    "FileReadAction": {f: f for f in ("path", "view_range", "thought")},
    "FileWriteAction": {f: f for f in ("path", "content", "thought")},
    "FileEditAction": {
        f: f for f in ("command", "path", "file_text", "old_str", "new_str", "insert_line")
    }
    | {"thought": "thought"},
    "TaskTrackingAction": {f: f for f in ("command", "task_list", "thought")},
    "ThinkAction": {"thought": "thought"},
    "AgentFinishAction": {"final_thought": "final_thought", "outputs": "outputs"},
    "CondensationAction": {
        "forgotten_start_id": "forgotten_events_start_id",
        "forgotten_end_id": "forgotten_events_end_id",
        "summary": "summary",
    },
    # `exit_code` in extras is OpenHands' older form, which it still reads (into `metadata`).
    "CmdOutputObservation": {"command": "command", "exit_code": "exit_code"},
    "FileReadObservation": {"path": "path"},
    "FileWriteObservation": {"path": "path"},
    "FileEditObservation": {"path": "path", "prev_exist": "prev_exist", "diff": "diff"},
    "TaskTrackingObservation": {"command": "command", "task_list": "task_list"},
    "ErrorObservation": {"code": "error_id"},
    "AgentStateChanged": {"agent_state": "agent_state", "reason": "reason"},
    "MCPAction": {f: f for f in ("name", "arguments", "thought")},
    "MCPObservation": {"name": "name", "arguments": "arguments"},
}
# OpenHands' own top-level keys: a payload field of that name would change what OpenHands
# reads (RuntimeControlRequested's `action` would look like an action), so it is renamed.
_OPENHANDS_TOP_KEYS = frozenset({"action", "observation", "args", "extras", "message"})


def stays_top_level(kind: str, name: str) -> bool:
    """Whether a Taskbus field of this kind stays at the wire view's top level (under
    `wire_name`), rather than going under OpenHands' name into `args` / `extras` / `content`."""
    event_type = EVENT_TYPES[kind]
    in_openhands_class = OPENHANDS_FIELDS.get(kind, {}).get(name) == name
    return not in_openhands_class and not (name == "content" and event_type.openhands_observation)


def wire_name(name: str) -> str:
    """A Taskbus field's top-level name in the wire view."""
    return f"taskbus_{name}" if name in _OPENHANDS_TOP_KEYS else name


def _summary(kind: str, payload: dict[str, Any]) -> str:
    """One line for an event OpenHands has no class for (the content of its `null`)."""
    words = [kind]
    for key in ("status", "agent_state", "action", "reason", "model", "detail"):
        if payload.get(key):
            words.append(f"{key}={payload[key]}")
    return " ".join(words)


def to_wire(stored: bytes | msgspec.Raw) -> dict[str, Any]:
    """Map one stored event (its JSON bytes) to the client view; unknown kinds pass through."""
    data: dict[str, Any] = msgspec.json.decode(stored)
    kind = data.get("kind", "")
    event_type = EVENT_TYPES.get(kind)
    if event_type is None:
        return data
    view = {key: data[key] for key in _ENVELOPE if key in data}
    payload = {key: value for key, value in data.items() if key not in _ENVELOPE}
    fields = OPENHANDS_FIELDS.get(kind, {})
    mapped = {theirs: payload[ours] for ours, theirs in fields.items() if ours in payload}
    rest = {wire_name(key): value for key, value in payload.items() if stays_top_level(kind, key)}
    if event_type.openhands_action is not None:
        view["action"] = event_type.openhands_action
        view["message"] = payload.get("content") or payload.get("thought") or ""
        view["args"] = mapped
    elif event_type.openhands_observation is not None:
        view["observation"] = event_type.openhands_observation
        view["content"] = payload.get("content", "")
        view["message"] = payload.get("reason") or view["content"][:200]
        view["extras"] = mapped
        if kind == "CmdOutputObservation":
            mapped["metadata"] = {"exit_code": payload.get("exit_code", -1)}
            if payload.get("cwd"):
                mapped["metadata"]["working_dir"] = payload["cwd"]
    else:
        view["observation"] = NULL_OBSERVATION
        view["content"] = payload.get("content") or _summary(kind, payload)
        view["message"] = view["content"][:200]
        view["extras"] = {}
        if kind == "LLMMetrics":
            # What OpenHands' frontend reads of its `llm_metrics` (the running cost).
            view["llm_metrics"] = {"accumulated_cost": payload.get("accumulated_cost", 0.0)}
    view.update(rest)
    return view
