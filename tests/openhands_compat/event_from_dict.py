"""OpenHands' `event_from_dict` (openhands/events/serialization/event.py, action.py,
observation.py at tag 0.56.0), ported with the fields each of its event classes takes, so a test
can say whether OpenHands would parse an event Taskbus serves without installing OpenHands.

It fails where OpenHands fails: no `action`/`observation` key, a name it has no class for, an
argument or extra its class does not take (`action_class(**args)` raises TypeError), a required
field missing, or a `source` that is no EventSource.
"""

from __future__ import annotations

from typing import Any

# action name -> (fields of the dataclass, fields without a default); openhands/events/action/*.py
ACTIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "message": (  # message.py MessageAction
        frozenset(
            {"content", "file_urls", "image_urls", "wait_for_response", "action", "security_risk"}
        ),
        frozenset({"content"}),
    ),
    "run": (  # commands.py CmdRunAction
        frozenset(
            {
                *("command", "is_input", "thought", "blocking", "is_static", "cwd", "hidden"),
                *("action", "confirmation_state", "security_risk"),
            }
        ),
        frozenset({"command"}),
    ),
    "read": (  # files.py FileReadAction
        frozenset(
            {"path", "start", "end", "thought", "action", "security_risk", "impl_source"}
            | {"view_range"}
        ),
        frozenset({"path"}),
    ),
    "write": (  # files.py FileWriteAction
        frozenset({"path", "content", "start", "end", "thought", "action", "security_risk"}),
        frozenset({"path", "content"}),
    ),
    "edit": (  # files.py FileEditAction
        frozenset(
            {
                *("path", "command", "file_text", "old_str", "new_str", "insert_line"),
                *("content", "start", "end", "thought", "action", "security_risk", "impl_source"),
            }
        ),
        frozenset({"path"}),
    ),
    "think": (frozenset({"thought", "action"}), frozenset()),  # agent.py AgentThinkAction
    "finish": (  # agent.py AgentFinishAction
        frozenset({"final_thought", "outputs", "thought", "action"}),
        frozenset(),
    ),
    "condensation": (  # agent.py CondensationAction
        frozenset(
            {
                *("action", "forgotten_event_ids", "forgotten_events_start_id"),
                *("forgotten_events_end_id", "summary", "summary_offset"),
            }
        ),
        frozenset(),
    ),
    "task_tracking": (  # agent.py TaskTrackingAction
        frozenset({"command", "task_list", "thought", "action"}),
        frozenset(),
    ),
    "call_tool_mcp": (  # mcp.py MCPAction
        frozenset({"name", "arguments", "thought", "action", "security_risk"}),
        frozenset({"name"}),
    ),
    "change_agent_state": (  # agent.py ChangeAgentStateAction
        frozenset({"agent_state", "thought", "action"}),
        frozenset({"agent_state"}),
    ),
}

# observation name -> (fields, required fields); openhands/events/observation/*.py. `content`
# comes from the top level; `observation` and `message` are popped before the class is built.
OBSERVATIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "null": (frozenset({"content"}), frozenset({"content"})),  # empty.py
    "run": (  # commands.py CmdOutputObservation (`exit_code` is its deprecated extra)
        frozenset({"content", "command", "metadata", "hidden", "exit_code"}),
        frozenset({"content", "command"}),
    ),
    "read": (frozenset({"content", "path", "impl_source"}), frozenset({"content", "path"})),
    "write": (frozenset({"content", "path"}), frozenset({"content", "path"})),
    "edit": (
        frozenset(
            {"content", "path", "prev_exist", "old_content", "new_content", "impl_source", "diff"}
        ),
        frozenset({"content"}),
    ),
    "error": (frozenset({"content", "error_id"}), frozenset({"content"})),
    "agent_state_changed": (
        frozenset({"content", "agent_state", "reason"}),
        frozenset({"content", "agent_state"}),
    ),
    "task_tracking": (frozenset({"content", "command", "task_list"}), frozenset({"content"})),
    "mcp": (frozenset({"content", "name", "arguments"}), frozenset({"content"})),  # mcp.py
    "user_rejected": (frozenset({"content"}), frozenset({"content"})),
    "success": (frozenset({"content"}), frozenset({"content"})),
}
EVENT_SOURCES = frozenset({"agent", "user", "environment"})
# Metrics' keys event_from_dict reads (llm_metrics is rebuilt as openhands.llm.metrics.Metrics).
LLM_METRICS_KEYS = frozenset(
    {"accumulated_cost", "max_budget_per_task", "costs", "response_latencies", "token_usages"}
    | {"accumulated_token_usage"}
)


class OpenHandsParseError(ValueError):
    """Where OpenHands' event_from_dict would raise (ValueError, KeyError, TypeError)."""


def _check_fields(
    name: str, given: dict[str, Any], fields: frozenset[str], required: frozenset[str]
) -> None:
    unknown = set(given) - fields
    if unknown:
        raise OpenHandsParseError(f"{name}: unexpected keyword arguments {sorted(unknown)}")
    missing = required - set(given)
    if missing:
        raise OpenHandsParseError(f"{name}: missing required arguments {sorted(missing)}")


def event_from_dict(data: dict[str, Any]) -> str:
    """The OpenHands class name the event parses as (`action:run`), or OpenHandsParseError."""
    if "action" in data:
        name = data["action"]
        if not isinstance(name, str) or name not in ACTIONS:
            raise OpenHandsParseError(f"action {name!r} is not defined")
        args = data.get("args", {})
        if not isinstance(args, dict):
            raise OpenHandsParseError("args must be an object")
        args = {k: v for k, v in args.items() if k not in ("timestamp", "is_confirmed")}
        _check_fields(name, args, *ACTIONS[name])
        parsed = f"action:{name}"
    elif "observation" in data:
        name = data["observation"]
        if name not in OBSERVATIONS:
            raise OpenHandsParseError(f"observation {name!r} is not defined")
        extras = data.get("extras", {})
        if not isinstance(extras, dict):
            raise OpenHandsParseError("extras must be an object")
        content = data.get("content", "")
        if not isinstance(content, str):
            raise OpenHandsParseError("content must be a string")
        _check_fields(name, {"content": content, **extras}, *OBSERVATIONS[name])
        parsed = f"observation:{name}"
    else:
        raise OpenHandsParseError(f"Unknown event type: {data}")
    if "source" in data and data["source"] not in EVENT_SOURCES:
        raise OpenHandsParseError(f"{data['source']!r} is not a valid EventSource")
    metrics = data.get("llm_metrics")
    if metrics is not None and (not isinstance(metrics, dict) or set(metrics) - LLM_METRICS_KEYS):
        raise OpenHandsParseError(f"llm_metrics it cannot read: {metrics!r}")
    return parsed
