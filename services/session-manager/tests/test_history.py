"""Events as the LLM's messages: tool calls paired with their results, by tool_call_id."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from taskbus.contracts.events import (
    AgentFinishAction,
    CmdOutputObservation,
    CmdRunAction,
    ConversationCreated,
    ErrorObservation,
    EventSource,
    FileEditAction,
    FileEditObservation,
    LLMMetrics,
    MessageAction,
    ThinkAction,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.tools import InvalidToolCall, action_from_tool_call, tool_call_of

FoldEvents = Callable[..., Any]
ENV = EventSource.ENVIRONMENT


def created() -> ConversationCreated:
    spec = ConversationSpec(
        initial_user_msg="hi",
        repository="https://example.com/r.git",
        selected_branch="main",
        conversation_instructions="Use tabs.",
    )
    return ConversationCreated(
        conversation_id="c1", source=EventSource.USER, user_id="u", spec=spec, title="t"
    )


def user(text: str) -> MessageAction:
    return MessageAction(conversation_id="c1", source=EventSource.USER, content=text)


def bash(command: str, call_id: str) -> CmdRunAction:
    return CmdRunAction(
        conversation_id="c1",
        source=EventSource.AGENT,
        command=command,
        thought="Listing.",
        tool_call_id=call_id,
    )


def test_system_prompt_carries_repository_and_instructions(fold_events: FoldEvents) -> None:
    (system, first) = to_messages(fold_events(created(), user("hi")))
    assert system["role"] == "system"
    assert "https://example.com/r.git at branch main" in system["content"]
    assert "<conversation_instructions>\nUse tabs." in system["content"]
    assert first == {"role": "user", "content": "hi"}


def test_actions_become_tool_calls_answered_by_their_observations(
    fold_events: FoldEvents,
) -> None:
    observation = CmdOutputObservation(
        conversation_id="c1", source=ENV, cause=2, content="a b", command="ls", exit_code=0
    )
    metrics = LLMMetrics(conversation_id="c1", source=EventSource.AGENT, model="m")
    messages = to_messages(
        fold_events(created(), user("hi"), bash("ls", "call_7"), observation, metrics)
    )
    assert messages[2] == {
        "role": "assistant",
        "content": "Listing.",
        "tool_calls": [
            {
                "id": "call_7",
                "type": "function",
                "function": {"name": "execute_bash", "arguments": json.dumps({"command": "ls"})},
            }
        ],
    }
    assert messages[3]["role"] == "tool"
    assert messages[3]["tool_call_id"] == "call_7"
    assert messages[3]["content"].startswith("a b\n[The command completed with exit code 0.]")
    assert len(messages) == 4  # metrics are not part of the conversation


def test_a_message_sent_while_an_action_runs_follows_its_result(fold_events: FoldEvents) -> None:
    observation = CmdOutputObservation(
        conversation_id="c1", source=ENV, cause=2, content="", command="make", exit_code=2
    )
    messages = to_messages(
        fold_events(created(), user("hi"), bash("make", "k"), user("stop that"), observation)
    )
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert messages[4]["content"] == "stop that"


def test_unanswered_calls_get_a_result_so_the_history_stays_valid(
    fold_events: FoldEvents,
) -> None:
    think = ThinkAction(
        conversation_id="c1", source=EventSource.AGENT, thought="plan", tool_call_id="t"
    )
    finish = AgentFinishAction(
        conversation_id="c1", source=EventSource.AGENT, final_thought="done", tool_call_id="f"
    )
    messages = to_messages(fold_events(created(), user("hi"), think, finish, user("more")))
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "user",
    ]
    assert messages[3] == {
        "role": "tool",
        "tool_call_id": "t",
        "content": "Your thought has been logged.",
    }
    assert json.loads(messages[4]["tool_calls"][0]["function"]["arguments"]) == {"message": "done"}


def test_errors_without_an_action_are_told_to_the_llm_but_llm_errors_are_not(
    fold_events: FoldEvents,
) -> None:
    bad_call = ErrorObservation(
        conversation_id="c1", source=ENV, content="unknown tool", code="invalid_tool_call"
    )
    auth = ErrorObservation(conversation_id="c1", source=ENV, content="denied", code="llm_auth")
    messages = to_messages(fold_events(created(), user("hi"), bad_call, auth))
    assert messages[-1] == {"role": "user", "content": "ERROR: unknown tool"}
    assert len(messages) == 3


def test_tool_calls_round_trip_through_actions() -> None:
    arguments = {"command": "str_replace", "path": "a.py", "old_str": "x", "new_str": "y"}
    action = action_from_tool_call("c1", "str_replace_editor", json.dumps(arguments), "id1", "Fix.")
    assert isinstance(action, FileEditAction)
    assert (action.tool_call_id, action.thought, action.old_str) == ("id1", "Fix.", "x")
    assert tool_call_of(action) == ("str_replace_editor", arguments)
    edited = FileEditObservation(conversation_id="c1", source=ENV, path="a.py", content="ok")
    assert tool_call_of(edited) is None


def test_string_booleans_from_the_llm_are_accepted() -> None:
    action = action_from_tool_call(
        "c1", "execute_bash", '{"command": "y", "is_input": "true"}', "i", ""
    )
    assert isinstance(action, CmdRunAction) and action.is_input


@pytest.mark.parametrize(
    ("name", "arguments"),
    [("rm_rf", "{}"), ("execute_bash", "{not json"), ("execute_bash", '{"cmd": "ls"}')],
)
def test_invalid_tool_calls_are_rejected(name: str, arguments: str) -> None:
    with pytest.raises(InvalidToolCall):
        action_from_tool_call("c1", name, arguments, "i", "")
