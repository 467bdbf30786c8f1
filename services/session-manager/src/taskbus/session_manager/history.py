"""The conversation as the LLM sees it: events mapped to OpenAI chat messages."""

from __future__ import annotations

import json
from typing import Any

from taskbus.contracts.events import (
    ActionProposed,
    AgentFinishAction,
    CmdOutputObservation,
    CommandTimeout,
    CondensationAction,
    ErrorObservation,
    Event,
    EventSource,
    FileWriteObservation,
    MCPObservation,
    MessageAction,
    ThinkAction,
)
from taskbus.session_manager.dependencies import dependencies_context
from taskbus.session_manager.state import OBSERVATIONS, ConversationState
from taskbus.session_manager.tools import tool_call_of

# Longest tool result sent back to the LLM; the full output stays in the log.
MAX_OBSERVATION_CHARS = 30_000
# Errors about the LLM itself: nothing the LLM could act on.
_LLM_ERROR_PREFIX = "llm_"

SYSTEM_PROMPT = """\
You are a coding agent working in a sandbox through tools. The workspace is {workspace}.
Work step by step: keep a plan with task_tracker, run commands with execute_bash, read and edit
files with str_replace_editor, and call finish with a short summary when the task is done.
{repository}{instructions}{dependencies}"""


def system_prompt(state: ConversationState) -> str:
    spec = state.spec
    repository = ""
    if spec.repository:
        branch = f" at branch {spec.selected_branch}" if spec.selected_branch else ""
        repository = f"The repository {spec.repository}{branch} is cloned in the workspace.\n"
    instructions = ""
    if spec.conversation_instructions:
        instructions = (
            f"\n<conversation_instructions>\n{spec.conversation_instructions}\n"
            "</conversation_instructions>\n"
        )
    dependencies = ""
    if state.dependencies is not None:
        context = dependencies_context(state.dependencies)
        dependencies = f"\n<dependencies>\n{context}\n</dependencies>\n"
    return SYSTEM_PROMPT.format(
        workspace=state.workspace or "the current directory",
        repository=repository,
        instructions=instructions,
        dependencies=dependencies,
    )


def _as_called(action: Event) -> Event:
    """The action as the LLM called it (a rejected proposal stands for its action)."""
    return action.proposed if isinstance(action, ActionProposed) else action


def tool_call_id(action: Event) -> str:
    return getattr(_as_called(action), "tool_call_id", "") or f"call_{action.id}"


def observation_text(event: Event) -> str:
    match event:
        case CmdOutputObservation():
            text = event.content
            if event.timed_out == CommandTimeout.SOFT:
                text += "\n[The command has no new output yet and is still running.]"
            elif event.timed_out == CommandTimeout.HARD:
                text += "\n[The command timed out and was killed.]"
            else:
                text += f"\n[The command completed with exit code {event.exit_code}.]"
            if event.cwd:
                text += f"\n[Current working directory: {event.cwd}]"
        case ErrorObservation():
            text = f"ERROR: {event.content}"
        case FileWriteObservation():
            text = event.content or f"Wrote {event.path}."
        case MCPObservation() if event.is_error:
            text = f"The tool reported an error:\n{event.content}"
        case _:
            text = str(getattr(event, "content", ""))
    if len(text) > MAX_OBSERVATION_CHARS:
        omitted = len(text) - MAX_OBSERVATION_CHARS
        text = text[:MAX_OBSERVATION_CHARS] + f"\n[... {omitted} characters omitted]"
    return text


def _unanswered_result(action: Event) -> str:
    """The tool result of an action no observation answers (think, finish, interruptions)."""
    if isinstance(action, ThinkAction):
        return "Your thought has been logged."
    if isinstance(action, AgentFinishAction):
        return "The task was marked as finished."
    return "No result: the action was interrupted before it completed."


def to_messages(state: ConversationState) -> list[dict[str, Any]]:
    """OpenAI messages for the next LLM call: each action as an assistant tool call followed by
    its tool result; messages that arrived while an action ran come after its result."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(state)}]
    open_action: Event | None = None
    deferred: list[dict[str, Any]] = []

    def close_open_action() -> None:
        nonlocal open_action
        if open_action is not None:
            messages.append(_tool_result(open_action, _unanswered_result(open_action)))
            open_action = None
        messages.extend(deferred)
        deferred.clear()

    for event in state.history:
        if (
            open_action is not None
            and isinstance(event, OBSERVATIONS)
            and event.cause == open_action.id
        ):
            messages.append(_tool_result(open_action, observation_text(event)))
            open_action = None
            messages.extend(deferred)
            deferred.clear()
            continue
        call = tool_call_of(event)
        if call is not None:
            close_open_action()
            name, arguments = call
            messages.append(_tool_call(event, name, arguments))
            open_action = event
            continue
        message = _plain_message(event)
        if message is not None:
            (deferred if open_action is not None else messages).append(message)
    close_open_action()
    return messages


def _tool_call(action: Event, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    called = _as_called(action)
    thought = "" if isinstance(called, ThinkAction) else getattr(called, "thought", "")
    return {
        "role": "assistant",
        "content": thought or None,
        "tool_calls": [
            {
                "id": tool_call_id(action),
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        ],
    }


def _tool_result(action: Event, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": tool_call_id(action), "content": content}


def _plain_message(event: Event) -> dict[str, Any] | None:
    """Messages, summaries of condensed events, and errors not tied to an action (e.g. a
    malformed tool call)."""
    if isinstance(event, CondensationAction):
        return {"role": "user", "content": event.summary}
    if isinstance(event, MessageAction):
        if event.image_urls and event.source == EventSource.USER:
            # OpenAI's content parts, which litellm carries to every provider that takes images.
            parts: list[dict[str, Any]] = [{"type": "text", "text": event.content}]
            parts += [{"type": "image_url", "image_url": {"url": url}} for url in event.image_urls]
            return {"role": "user", "content": parts}
        role = "user" if event.source == EventSource.USER else "assistant"
        return {"role": role, "content": event.content}
    if isinstance(event, ErrorObservation) and not event.code.startswith(_LLM_ERROR_PREFIX):
        return {"role": "user", "content": observation_text(event)}
    return None
