"""The CLI's one-line rendering of events, from the wire view clients receive."""

from __future__ import annotations

from taskbus.contracts.events import (
    CmdOutputObservation,
    CmdRunAction,
    Event,
    EventSource,
    LLMMetrics,
    ToolCall,
    ToolCallsQueued,
    encode_event,
)
from taskbus.contracts.wire import to_wire
from taskbus.devtools.client import render_event

CID = "c1"


def rendered(event: Event) -> str:
    return render_event(to_wire(encode_event(event)))


def test_each_kind_shows_its_gist() -> None:
    command = CmdRunAction(conversation_id=CID, source=EventSource.AGENT, id=4, command="ls -la")
    assert rendered(command).split() == ["4", "agent", "CmdRunAction", "ls", "-la"]
    output = CmdOutputObservation(
        conversation_id=CID,
        source=EventSource.ENVIRONMENT,
        id=5,
        cause=4,
        command="ls -la",
        content="a\nb",
        exit_code=0,
    )
    assert rendered(output).endswith("CmdOutputObservation       exit 0: a b")
    metrics = LLMMetrics(
        conversation_id=CID,
        source=EventSource.AGENT,
        model="openai/m",
        prompt_tokens=10,
        completion_tokens=2,
        cost=0.5,
        accumulated_cost=1.25,
    )
    assert "openai/m 10+2 tokens $0.500000 (total $1.250000)" in rendered(metrics)
    queued = ToolCallsQueued(
        conversation_id=CID,
        source=EventSource.AGENT,
        calls=[
            ToolCall(id="a", name="task_tracker", arguments="{}"),
            ToolCall(id="b", name="execute_bash", arguments="{}"),
        ],
    )
    assert rendered(queued).endswith("2 tool calls, run in turn: task_tracker, execute_bash")


def test_long_gists_are_cut_to_one_line() -> None:
    command = CmdRunAction(conversation_id=CID, source=EventSource.AGENT, command="x" * 500)
    line = rendered(command)
    assert "\n" not in line and line.endswith("...") and len(line) < 160
