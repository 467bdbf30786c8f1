"""MCP tools in the agent loop, as pure functions of the log: what is offered to the LLM, how a
call becomes an `MCPAction` (or the invalid-tool-call error), how it reads in the history, and
that a server that failed at start stops nothing."""

from __future__ import annotations

import json

import msgspec

from taskbus.contracts.events import (
    ActionProposed,
    ErrorObservation,
    EventSource,
    MCPAction,
    MCPObservation,
    MCPTool,
    MCPToolsListed,
    ToolCall,
)
from taskbus.contracts.specs import MCPConfig, MCPStdioServer, UserSettings
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.session_manager.decide import Step, as_proposal, next_step, start_events
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.service import effective_spec
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.tools import TOOLS, event_for_call, offered_tools, tool_call_of

from .test_state import FoldEvents, created, requested, started, status

ADD = MCPTool(
    server="probe",
    name="probe_add",
    tool="add",
    description="Add two integers.",
    input_schema={"type": "object", "properties": {"a": {"type": "integer"}}},
)


def listed(*tools: MCPTool) -> MCPToolsListed:
    return MCPToolsListed(
        conversation_id="c1", source=EventSource.ENVIRONMENT, tools=list(tools), cause=3
    )


def server_failed() -> ErrorObservation:
    return ErrorObservation(
        conversation_id="c1",
        source=EventSource.ENVIRONMENT,
        cause=3,
        code="mcp_server_failed",
        content="The MCP server ghost could not be used: not found",
    )


def call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id="call_1", name=name, arguments=arguments)


def test_listed_tools_are_offered_after_the_built_ins(fold_events: FoldEvents) -> None:
    events = started()
    state = fold_events(*events[:4], listed(ADD), *events[4:])
    offered = offered_tools(state.mcp_tools)
    assert offered[: len(TOOLS)] == TOOLS
    (mcp,) = offered[len(TOOLS) :]
    assert mcp["function"] == {
        "name": "probe_add",
        "description": "Add two integers.",
        "parameters": ADD.input_schema,
    }
    # A new sandbox lists its own tools: the old ones are gone until then.
    assert fold_events(*events, listed(ADD), requested()).mcp_tools == ()


def test_a_call_of_a_listed_tool_is_an_mcp_action_and_reads_back_as_the_same_call() -> None:
    action = event_for_call("c1", call("probe_add", '{"a": 1, "b": 2}'), "adding", mcp_tools=[ADD])
    assert isinstance(action, MCPAction)
    assert (action.name, action.arguments, action.thought) == (
        "probe_add",
        {"a": 1, "b": 2},
        "adding",
    )
    assert tool_call_of(action) == ("probe_add", {"a": 1, "b": 2})


def test_unlisted_tools_and_non_object_arguments_are_invalid_tool_calls() -> None:
    for name, arguments, mcp_tools in (
        ("probe_add", '{"a": 1}', []),  # no such tool in this sandbox
        ("probe_add", "[1, 2]", [ADD]),
        ("probe_add", "3", [ADD]),
        ("probe_add", "{not json", [ADD]),
    ):
        error = event_for_call("c1", call(name, arguments), "", mcp_tools=mcp_tools)
        assert isinstance(error, ErrorObservation) and error.code == "invalid_tool_call", error


def test_the_observation_answers_the_call_in_the_history(fold_events: FoldEvents) -> None:
    action = MCPAction(
        conversation_id="c1", source=EventSource.AGENT, name="probe_add", arguments={"a": 1}
    )
    events = [*started(), listed(ADD), action]
    state = fold_events(*events)
    assert state.open_action is not None and next_step(state) is Step.WAIT  # the runtime's turn
    failed = MCPObservation(
        conversation_id="c1",
        source=EventSource.ENVIRONMENT,
        cause=len(events) - 1,
        name="probe_add",
        content="boom",
        is_error=True,
    )
    state = fold_events(*events, failed)
    assert state.open_action is None and next_step(state) is Step.CALL_LLM
    messages = to_messages(state)
    tool_call = messages[-2]["tool_calls"][0]["function"]
    assert (tool_call["name"], json.loads(tool_call["arguments"])) == ("probe_add", {"a": 1})
    assert messages[-1]["role"] == "tool" and "error" in messages[-1]["content"]
    assert "boom" in messages[-1]["content"]


def test_a_server_that_failed_at_start_stops_nothing(fold_events: FoldEvents) -> None:
    events = started()
    # The runtime's listing and error come before READY: the agent runs, the LLM is told.
    state = fold_events(*events[:4], listed(), server_failed(), *events[4:])
    assert state.status == ConversationStatus.RUNNING and state.agent_state == AgentState.RUNNING
    assert next_step(state) is Step.CALL_LLM
    assert any("ghost" in str(m["content"]) for m in to_messages(state))
    # Starting: the error does not fail the start either.
    starting = fold_events(
        created(), status(ConversationStatus.STARTING), requested(), server_failed()
    )
    assert next_step(starting) is Step.WAIT


def test_mcp_calls_wait_for_confirmation_in_confirmation_mode(fold_events: FoldEvents) -> None:
    state = fold_events(*started(confirmation_mode=True), listed(ADD))
    action = MCPAction(conversation_id="c1", source=EventSource.AGENT, name="probe_add")
    assert isinstance(as_proposal(state, action), ActionProposed)


def test_the_users_default_mcp_config_applies_and_reaches_the_runtime(
    fold_events: FoldEvents,
) -> None:
    config = MCPConfig(stdio_servers=[MCPStdioServer(name="probe", command="python3")])
    own = MCPConfig(stdio_servers=[MCPStdioServer(name="own", command="node")])
    settings = SessionManagerSettings()
    spec = created().spec
    assert effective_spec(spec, UserSettings(mcp_config=config), settings).mcp_config == config
    with_own = msgspec.structs.replace(spec, mcp_config=own)
    assert effective_spec(with_own, UserSettings(mcp_config=config), settings).mcp_config == own
    state = fold_events(msgspec.structs.replace(created(), spec=with_own))
    (runtime,) = [e for e in start_events(state) if e.kind == "RuntimeRequested"]
    assert runtime.mcp_config == own  # type: ignore[attr-defined]
