"""Session-manager end to end against real NATS, real litellm and the scripted model over HTTP.

The test plays runtime-runner's part (sandbox ready, command and edit observations); the real
runtime is exercised by the cross-service tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm
import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.commands import (
    Command,
    ConfirmAction,
    CreateConversation,
    SendMessage,
    StopConversation,
    UpdateSettings,
    command_subject,
    encode_command,
)
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.events import (
    ActionProposed,
    AgentFinishAction,
    AgentStateChanged,
    CmdOutputChunk,
    CmdOutputObservation,
    CmdRunAction,
    CondensationAction,
    ConfirmationGiven,
    ConfirmationRequested,
    ConversationCreated,
    ConversationStatusChanged,
    ErrorObservation,
    Event,
    EventSource,
    FileEditAction,
    FileEditObservation,
    LLMMetrics,
    MCPTool,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeRequested,
    RuntimeStatusChanged,
    TaskTrackingAction,
    TaskTrackingObservation,
    ThinkAction,
    ToolCallsQueued,
    UnknownEvent,
    decode_event,
)
from taskbus.contracts.secret_box import SecretBox, generate_key, llm_key_context
from taskbus.contracts.specs import ConversationSpec, Timeouts, UserSettings
from taskbus.contracts.status import AgentState, ConversationStatus, RuntimeStatus
from taskbus.devtools.nats_server import NatsServer
from taskbus.devtools.scripted_llm import ScriptedLLM
from taskbus.session_manager.app import running_session_manager
from taskbus.session_manager.llm import LLM, LLMConfig, token_bound
from taskbus.session_manager.service import SessionManager
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.tools import offered_tools

from .conftest import RUNNER_ALIVE, register_fake_runner

INPUT_PRICE = 3e-6
OUTPUT_PRICE = 1.5e-5
S = ConversationStatus
A = AgentState


@pytest.fixture(scope="module")
def scripted_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


@pytest.fixture
def settings(own_nats: str, scripted_llm: ScriptedLLM) -> SessionManagerSettings:
    return SessionManagerSettings(
        nats_url=own_nats,
        llm_base_url=scripted_llm.url,
        llm_api_key="scripted",
        llm_input_cost_per_token=INPUT_PRICE,
        llm_output_cost_per_token=OUTPUT_PRICE,
        max_running=100,
        **RUNNER_ALIVE,
    )


@pytest.fixture
async def session_manager(settings: SessionManagerSettings) -> AsyncIterator[SessionManager]:
    async with running_session_manager(settings) as manager:
        yield manager


class FakeRuntime:
    """Plays runtime-runner for one conversation and records every event of it."""

    def __init__(self, js: JetStreamContext, conversation_id: str) -> None:
        self.js = js
        self.cid = conversation_id
        self.events: list[Event | UnknownEvent] = []
        self._appender = EventAppender(js)
        self._changed = asyncio.Event()
        self.hold_commands = False  # leave commands unanswered until answer_held()
        self._held: list[CmdRunAction] = []

    async def run(self) -> None:
        sub = await self.js.subscribe(subjects.conversation_events(self.cid), ordered_consumer=True)
        try:
            async for msg in sub.messages:
                event = decode_event(msg.data)
                self.events.append(event)
                self._changed.set()
                await self._react(event)
        finally:
            await sub.unsubscribe()  # a cancelled iteration leaves it undrainable

    async def _react(self, event: Event | UnknownEvent) -> None:
        env: dict[str, Any] = {
            "conversation_id": self.cid,
            "source": EventSource.ENVIRONMENT,
            "cause": event.id,
        }
        match event:
            case RuntimeRequested():
                ready = RuntimeStatusChanged(
                    **env, status=RuntimeStatus.READY, backend="test", workspace="/workspace"
                )
                await self._appender.append(ready)
            case RuntimeControlRequested():
                answered = {
                    RuntimeControl.STOP: RuntimeStatus.STOPPED,
                    RuntimeControl.PAUSE: RuntimeStatus.PAUSED,
                    RuntimeControl.RESUME: RuntimeStatus.READY,
                }[event.action]
                status = RuntimeStatusChanged(**env, status=answered, reason=event.reason)
                await self._appender.append(status)
            case CmdRunAction() if self.hold_commands:
                self._held.append(event)
            case CmdRunAction():
                await self._answer(event)
            case FileEditAction():
                await self._appender.append(
                    FileEditObservation(**env, path=event.path, content="File created.")
                )

    async def _answer(self, command: CmdRunAction) -> None:
        await self._appender.append(
            CmdOutputObservation(
                conversation_id=self.cid,
                source=EventSource.ENVIRONMENT,
                cause=command.id,
                content="hello.txt\n",
                command=command.command,
                exit_code=0,
            )
        )

    async def answer_held(self) -> None:
        self.hold_commands = False
        for command in self._held:
            await self._answer(command)
        self._held.clear()

    async def wait_for(self, condition: Condition) -> None:
        async with asyncio.timeout(20):
            while not condition(self.events):
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


@contextlib.asynccontextmanager
async def fake_runtime(js: JetStreamContext, cid: str) -> AsyncIterator[FakeRuntime]:
    runtime = FakeRuntime(js, cid)
    task = asyncio.create_task(runtime.run())
    try:
        yield runtime
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def send(js: JetStreamContext, command: Command, name: str) -> None:
    assert command.name() == name
    await js.publish(
        command_subject(command),
        encode_command(command),
        headers={"Nats-Msg-Id": uuid.uuid4().hex},
    )


Condition = Callable[[list[Event | UnknownEvent]], bool]


def status_reached(status: ConversationStatus, count: int = 1) -> Condition:
    def reached(events: list[Event | UnknownEvent]) -> bool:
        seen = [e for e in events if isinstance(e, ConversationStatusChanged)]
        return sum(e.status == status for e in seen) >= count

    return reached


def runtime_reached(status: RuntimeStatus) -> Condition:
    def reached(events: list[Event | UnknownEvent]) -> bool:
        return any(isinstance(e, RuntimeStatusChanged) and e.status == status for e in events)

    return reached


def statuses(runtime: FakeRuntime) -> list[tuple[str, str]]:
    return [(e.status, e.reason) for e in runtime.of(ConversationStatusChanged)]  # type: ignore[attr-defined]


async def test_demo_task_runs_to_finish_with_priced_steps(
    bus: JetStreamContext, session_manager: SessionManager, scripted_llm: ScriptedLLM
) -> None:
    cid = uuid.uuid4().hex
    spec = ConversationSpec(initial_user_msg="Set up a hello world workspace, please.")
    async with fake_runtime(bus, cid) as runtime:
        # A malformed command is dropped without stopping the consumer.
        await bus.publish(
            subjects.conversation_command_subject(cid, "CreateConversation"), b"{oops"
        )
        create = CreateConversation(user_id="alice", conversation_id=cid, spec=spec)
        await send(bus, create, "CreateConversation")
        await send(bus, create, "CreateConversation")  # a retry changes nothing
        await runtime.wait_for(status_reached(S.FINISHED))

    events = runtime.events
    assert [e.id for e in events] == list(range(len(events)))
    assert len(runtime.of(ConversationCreated)) == 1
    (conversation,) = runtime.of(ConversationCreated)
    assert conversation.title == "Set up a hello world workspace, please."  # type: ignore[attr-defined]
    assert [s for s, _ in statuses(runtime)] == [S.STARTING, S.RUNNING, S.FINISHED]

    actions = [
        e
        for e in events
        if isinstance(e, (TaskTrackingAction, CmdRunAction, FileEditAction, AgentFinishAction))
    ]
    assert [type(a).__name__ for a in actions] == [
        "TaskTrackingAction",
        "CmdRunAction",
        "TaskTrackingAction",
        "FileEditAction",
        "TaskTrackingAction",
        "AgentFinishAction",
    ]
    assert [a.tool_call_id for a in actions] == [f"call_s{i}_0" for i in range(6)]
    plans = [[t.status for t in a.task_list] for a in runtime.of(TaskTrackingAction)]  # type: ignore[attr-defined]
    assert plans == [["todo"] * 3, ["done", "in_progress", "todo"], ["done"] * 3]
    tracked = runtime.of(TaskTrackingObservation)
    assert [o.cause for o in tracked] == [a.id for a in runtime.of(TaskTrackingAction)]
    assert "[x] 1. Create hello.txt" in tracked[-1].content  # type: ignore[attr-defined]
    (command,) = runtime.of(CmdRunAction)
    assert command.command == "echo hello > hello.txt && ls"  # type: ignore[attr-defined]

    # Every action comes right after the metrics of the completion that chose it.
    for action in actions:
        assert isinstance(events[action.id - 1], LLMMetrics)
    metrics = runtime.of(LLMMetrics)
    assert len(metrics) == 6
    answered = {r.response["id"]: r.response for r in scripted_llm.player.requests}
    accumulated = 0.0
    for m in metrics:
        assert isinstance(m, LLMMetrics)
        prompt_cost, completion_cost = litellm.cost_per_token(
            model="openai/scripted",
            prompt_tokens=m.prompt_tokens,
            completion_tokens=m.completion_tokens,
        )
        expected = m.prompt_tokens * INPUT_PRICE + m.completion_tokens * OUTPUT_PRICE
        assert m.cost == pytest.approx(prompt_cost + completion_cost, rel=1e-9)
        assert m.cost == pytest.approx(expected, rel=1e-9)
        accumulated += m.cost
        assert m.accumulated_cost == pytest.approx(accumulated, rel=1e-9)
        assert m.model == "openai/scripted" and m.response_id.startswith("chatcmpl-scripted")
        # litellm's own price of the very response the model sent.
        response = litellm.ModelResponse(**answered[m.response_id])
        assert m.cost == litellm.completion_cost(
            completion_response=response, custom_llm_provider="openai"
        )
    # Prompts grow as the history does: each call saw the previous results.
    assert [m.prompt_tokens for m in metrics] == sorted(m.prompt_tokens for m in metrics)  # type: ignore[attr-defined]
    (finish,) = runtime.of(AgentFinishAction)
    assert finish.final_thought == "Created hello.txt and README.md in the workspace."  # type: ignore[attr-defined]


async def test_iteration_limit_errors_and_a_user_message_continues(tmp_path: Path) -> None:
    spec = ConversationSpec(initial_user_msg="Do the demo.", max_iterations=2)
    async with agent_stack(tmp_path, None) as stack, stack.conversation("bob", spec) as runtime:
        await runtime.wait_for(status_reached(S.ERROR))
        assert statuses(runtime)[-1] == (S.ERROR, "max_iterations")
        assert len(runtime.of(LLMMetrics)) == 2
        # The limit forbids the next call, not the answer of the last one allowed: the second
        # call's command was appended after its metrics, and answered.
        (run,) = runtime.of(CmdRunAction)
        assert runtime.of(LLMMetrics)[-1].id == run.id - 1
        assert runtime.of(CmdOutputObservation)[-1].cause == run.id  # type: ignore[attr-defined]
        await asyncio.sleep(0.3)
        assert len(stack.llm.player.requests) == 2  # no third call was even attempted

        # Another user's message is ignored; the owner's continues for two more iterations.
        cid = runtime.cid
        intruder = SendMessage(user_id="mallory", conversation_id=cid, content="hijack")
        await send(stack.js, intruder, "SendMessage")
        message = SendMessage(user_id="bob", conversation_id=cid, content="Please go on.")
        await send(stack.js, message, "SendMessage")
        await runtime.wait_for(status_reached(S.ERROR, count=2))
        assert len(stack.llm.player.requests) == 4

    assert [s for s, _ in statuses(runtime)] == [S.STARTING, S.RUNNING, S.ERROR, S.RUNNING, S.ERROR]
    assert statuses(runtime)[-1] == (S.ERROR, "max_iterations")
    assert len(runtime.of(LLMMetrics)) == 4
    contents = [getattr(e, "content", None) for e in runtime.events]
    assert "hijack" not in contents and "Please go on." in contents
    assert [
        type(a).__name__
        for a in runtime.events
        if isinstance(a, (TaskTrackingAction, CmdRunAction, FileEditAction))
    ] == [
        "TaskTrackingAction",
        "CmdRunAction",
        "TaskTrackingAction",
        "FileEditAction",
    ]


async def _down_while_the_demo_command_runs(
    bus: JetStreamContext, settings: SessionManagerSettings, runtime: FakeRuntime
) -> None:
    """The demo, driven by a session-manager that stops once the command is asked for; the
    command's observation then arrives while nobody listens."""
    runtime.hold_commands = True
    async with running_session_manager(settings):
        spec = ConversationSpec(initial_user_msg="Do the demo.")
        create = CreateConversation(user_id="carol", conversation_id=runtime.cid, spec=spec)
        await send(bus, create, "CreateConversation")
        await runtime.wait_for(lambda events: any(isinstance(e, CmdRunAction) for e in events))
    await runtime.answer_held()


async def test_a_restarted_session_manager_resumes_without_repeating_steps(
    bus: JetStreamContext, settings: SessionManagerSettings
) -> None:
    async with fake_runtime(bus, uuid.uuid4().hex) as runtime:
        await _down_while_the_demo_command_runs(bus, settings, runtime)
        await asyncio.sleep(0.2)
        assert not runtime.of(LLMMetrics)[2:]
        async with running_session_manager(settings):
            await runtime.wait_for(status_reached(S.FINISHED))

    assert len(runtime.of(CmdRunAction)) == 1
    assert len(runtime.of(LLMMetrics)) == 6
    assert [type(e).__name__ for e in runtime.events].count("AgentFinishAction") == 1
    assert [e.id for e in runtime.events] == list(range(len(runtime.events)))


async def test_a_paid_call_cut_off_before_its_action_is_made_again_and_both_are_on_record(
    bus: JetStreamContext, settings: SessionManagerSettings
) -> None:
    """An LLM step appends its metrics, then its action: a holder cut off between the two
    leaves a paid call without its answer. The next holder calls the model again and goes on;
    the cut-off call stays on record and in the cost."""
    cid = uuid.uuid4().hex
    async with fake_runtime(bus, cid) as runtime:
        await _down_while_the_demo_command_runs(bus, settings, runtime)
        await runtime.wait_for(lambda events: isinstance(events[-1], CmdOutputObservation))
        # What the stopped holder appended of its next step before it was cut off.
        last = runtime.of(LLMMetrics)[-1]
        cut_off = LLMMetrics(
            conversation_id=cid,
            source=EventSource.AGENT,
            model=last.model,  # type: ignore[attr-defined]
            cost=0.5,
            accumulated_cost=last.accumulated_cost + 0.5,  # type: ignore[attr-defined]
            response_id="cut-off",
        )
        cut_off = await EventAppender(bus).append(cut_off)
        async with running_session_manager(settings):
            await runtime.wait_for(status_reached(S.FINISHED))

    metrics = runtime.of(LLMMetrics)
    assert len(metrics) == 7  # the demo's six calls and the one cut off
    (again,) = [e for e in runtime.events if e.id == cut_off.id + 1]
    assert isinstance(again, LLMMetrics) and again.response_id != "cut-off"
    assert again.accumulated_cost == pytest.approx(cut_off.accumulated_cost + again.cost)
    (action,) = [e for e in runtime.events if e.id == again.id + 1]
    assert isinstance(action, TaskTrackingAction)  # the demo's third step, once
    assert len(runtime.of(TaskTrackingAction)) == 3
    assert [e.id for e in runtime.events] == list(range(len(runtime.events)))


async def test_a_stop_decided_on_a_state_behind_the_log_is_decided_again_at_once(
    bus: JetStreamContext, settings: SessionManagerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst of output chunks from the runner leaves session-manager's state behind the log
    (its events consumer takes them one by one) when a stop arrives on the commands consumer,
    so the stop is decided on a state the log has left. It is decided again at once on the log
    as it is, not nak'd to come back a second later, and its three events (status, agent state,
    sandbox stop) are appended together after the chunks."""
    cid = uuid.uuid4().hex
    spec = ConversationSpec(initial_user_msg="Do the demo.")
    async with fake_runtime(bus, cid) as runtime, running_session_manager(settings):
        runtime.hold_commands = True
        create = CreateConversation(user_id="carol", conversation_id=cid, spec=spec)
        await send(bus, create, "CreateConversation")
        await runtime.wait_for(lambda events: any(isinstance(e, CmdRunAction) for e in events))
        (command,) = runtime.of(CmdRunAction)
        appender = EventAppender(bus)
        for seq in range(200):
            chunk = CmdOutputChunk(
                conversation_id=cid,
                source=EventSource.ENVIRONMENT,
                cause=command.id,
                content=f"line {seq}\n",
                seq=seq,
            )
            await appender.append(chunk)
        with caplog.at_level(logging.ERROR, logger="taskbus.session_manager"):
            await send(
                bus, StopConversation(user_id="carol", conversation_id=cid), "StopConversation"
            )
            await runtime.wait_for(status_reached(S.STOPPED))

    assert not [r for r in caplog.records if "redelivered" in r.getMessage()]
    events = runtime.events
    (stopped,) = [
        i
        for i, e in enumerate(events)
        if isinstance(e, ConversationStatusChanged) and e.status == S.STOPPED
    ]
    assert [type(e).__name__ for e in events[stopped - 1 : stopped + 3]] == [
        "CmdOutputChunk",
        "ConversationStatusChanged",
        "AgentStateChanged",
        "RuntimeControlRequested",
    ]
    assert [e.id for e in events] == list(range(len(events)))


def test_settings_defaults_work_on_a_laptop_and_env_overrides_them() -> None:
    default = settings_from_env(SessionManagerSettings, {})
    assert default.llm_model == "openai/scripted"
    assert default.nats_url == "nats://127.0.0.1:4222"
    tuned = settings_from_env(SessionManagerSettings, {"TASKBUS_MAX_RUNNING": "3"})
    assert tuned.max_running == 3


@pytest.mark.parametrize("model", ["openai/scripted", "gpt-4o", "gpt-3.5-turbo"])
def test_the_token_bound_is_above_the_count_so_skipping_the_count_never_skips_a_condensation(
    model: str,
) -> None:
    """The agent loop skips counting a prompt's tokens while `token_bound` fits the context: the
    bound must stay above litellm's count for text of any kind and every tool offered."""
    mcp = MCPTool(
        server="s",
        name="s_query",
        tool="query",
        input_schema={
            "type": "object",
            "properties": {
                "q": {"type": "string", "enum": ["a", "b"]},
                "n": {"type": "array", "items": {"type": "integer"}},
            },
            "required": ["q"],
        },
    )
    tools = offered_tools([mcp])
    call = {"id": "c1", "type": "function", "function": {"name": "s_query", "arguments": "{}"}}
    texts = ["", "a", " " * 300, "日本語のテキスト🙂" * 40, "x = [1, 2]\n" * 50, "\u200b" * 100]
    prompts = [[{"role": "user", "content": text} for _ in range(20)] for text in texts] + [
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "assistant", "content": None, "tool_calls": [call] * 5},
            {"role": "tool", "tool_call_id": "c1", "name": "s_query", "content": "ok " * 99},
        ]
    ]
    llm = LLM(SessionManagerSettings())
    config = LLMConfig(model=model, base_url=None)
    for messages in prompts:
        for offered in (tools, []):
            bound = token_bound(messages, offered)
            assert bound is not None
            assert llm.count_tokens(config, messages, offered) < bound
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    assert token_bound([{"role": "user", "content": [image]}], tools) is None


# --- one isolated stack per test: its own nats-server, scripted model and session-manager ------

FIXED_MODEL = "openai/scripted-fixed-price"
FIXED_TOKENIZER = "openai/scripted"  # the model the condensation test counts tokens for
FIXED_USAGE = {"prompt_tokens": 1000, "completion_tokens": 500}  # at the prices below: $0.40
FIXED_INPUT_PRICE = 2e-4
FIXED_OUTPUT_PRICE = 4e-4


@dataclass
class Stack:
    js: JetStreamContext
    llm: ScriptedLLM
    settings: SessionManagerSettings
    manager: SessionManager

    @contextlib.asynccontextmanager
    async def conversation(
        self, user_id: str, spec: ConversationSpec
    ) -> AsyncIterator[FakeRuntime]:
        """A new conversation of `user_id`, with a fake runtime answering its actions."""
        cid = uuid.uuid4().hex
        async with fake_runtime(self.js, cid) as runtime:
            create = CreateConversation(user_id=user_id, conversation_id=cid, spec=spec)
            await send(self.js, create, "CreateConversation")
            yield runtime


@contextlib.asynccontextmanager
async def agent_stack(
    tmp_path: Path,
    script: dict[str, Any] | None,
    settings: SessionManagerSettings | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """Nothing shared with other tests, so request counts and recovered conversations are ours."""
    with NatsServer(tmp_path / "nats") as server, ScriptedLLM(script) as llm:
        base = settings or SessionManagerSettings(
            llm_api_key="scripted",
            llm_input_cost_per_token=INPUT_PRICE,
            llm_output_cost_per_token=OUTPUT_PRICE,
        )
        tuned = msgspec.structs.replace(
            base,
            nats_url=server.url,
            llm_base_url=llm.url,
            max_running=100,
            llm_retry_backoff_seconds=0.01,
            **{**RUNNER_ALIVE, **overrides},
        )
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await register_fake_runner(js)
            async with running_session_manager(tuned) as manager:
                yield Stack(js=js, llm=llm, settings=tuned, manager=manager)
        finally:
            await nc.drain()


def think(thought: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"tool_calls": [{"name": "think", "arguments": {"thought": thought}}]}
    return step | ({"usage": usage} if usage else {})


def bash_step(command: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "execute_bash", "arguments": {"command": command}}]}


def finish(message: str = "Done.", usage: dict[str, int] | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"tool_calls": [{"name": "finish", "arguments": {"message": message}}]}
    return step | ({"usage": usage} if usage else {})


def agent_states(runtime: FakeRuntime) -> list[tuple[str, str]]:
    return [(e.agent_state, e.reason) for e in runtime.of(AgentStateChanged)]  # type: ignore[attr-defined]


def agent_state_reached(state: AgentState, count: int = 1) -> Condition:
    def reached(events: list[Event | UnknownEvent]) -> bool:
        seen = [e for e in events if isinstance(e, AgentStateChanged)]
        return sum(e.agent_state == state for e in seen) >= count

    return reached


def tool_results(request_body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request_body["messages"] if m["role"] == "tool"]


PARALLEL_CALLS_SCRIPT: dict[str, Any] = {
    "steps": [
        {
            "content": "Plan, look, then write.",
            "tool_calls": [
                {
                    "name": "task_tracker",
                    "arguments": {
                        "command": "plan",
                        "task_list": [{"id": "1", "title": "Write notes", "status": "in_progress"}],
                    },
                },
                {"name": "execute_bash", "arguments": {"command": "ls"}},
                {
                    "name": "str_replace_editor",
                    "arguments": {"command": "create", "path": "notes.md", "file_text": "notes"},
                },
            ],
        },
        finish("Wrote notes.md."),
    ]
}


async def test_several_tool_calls_in_one_response_all_run_in_order(tmp_path: Path) -> None:
    spec = ConversationSpec(initial_user_msg="Write some notes.")
    async with (
        agent_stack(tmp_path, PARALLEL_CALLS_SCRIPT) as stack,
        stack.conversation("ines", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.FINISHED))

    (queue,) = runtime.of(ToolCallsQueued)
    assert isinstance(queue, ToolCallsQueued)
    assert [call.name for call in queue.calls] == [
        "task_tracker",
        "execute_bash",
        "str_replace_editor",
    ]
    work = [e for e in runtime.events if e.id > queue.id and not isinstance(e, AgentStateChanged)]
    assert [type(e).__name__ for e in work][:7] == [
        "TaskTrackingAction",
        "TaskTrackingObservation",
        "CmdRunAction",
        "CmdOutputObservation",
        "FileEditAction",
        "FileEditObservation",
        "LLMMetrics",
    ]
    released = [work[0], work[2], work[4]]
    assert [e.cause for e in released] == [queue.id] * 3
    assert [getattr(e, "tool_call_id", "") for e in released] == [c.id for c in queue.calls]
    # One LLM call for the three tool calls; the next one saw every call answered, in order.
    assert len(runtime.of(LLMMetrics)) == 2 and len(stack.llm.player.requests) == 2
    last_request = stack.llm.player.requests[-1].body["messages"]
    called = [m["tool_calls"][0]["id"] for m in last_request if m["role"] == "assistant"]
    answered = [m["tool_call_id"] for m in last_request if m["role"] == "tool"]
    assert called == answered == [c.id for c in queue.calls]
    assert "hello.txt" in tool_results(stack.llm.player.requests[-1].body)[1]


async def test_an_idle_conversation_pauses_wakes_on_a_message_and_gives_its_sandbox_back(
    tmp_path: Path,
) -> None:
    script = {
        "steps": [
            {"content": "Which file should I change?"},
            finish("Changed it."),
            finish("Did that too."),
        ]
    }
    spec = ConversationSpec(initial_user_msg="Fix a file.", timeouts=Timeouts(idle_seconds=1))
    async with (
        agent_stack(tmp_path, script, time_limit_check_seconds=0.1) as stack,
        stack.conversation("jo", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.PAUSED))
        assert statuses(runtime)[-1] == (S.PAUSED, "idle")
        (created,) = runtime.of(ConversationCreated)
        assert created.spec.timeouts.idle_seconds == 1  # type: ignore[attr-defined]
        assert created.spec.timeouts.max_duration_seconds is None  # type: ignore[attr-defined]
        answer = SendMessage(user_id="jo", conversation_id=runtime.cid, content="main.py")
        await send(stack.js, answer, "SendMessage")
        await runtime.wait_for(status_reached(S.FINISHED))
        await runtime.wait_for(runtime_reached(RuntimeStatus.STOPPED))

        # Settled, it leaves memory; a later message folds it from the log and goes on.
        for _ in range(200):
            if runtime.cid not in stack.manager.held_conversations:
                break
            await asyncio.sleep(0.05)
        assert runtime.cid not in stack.manager.held_conversations
        again = SendMessage(user_id="jo", conversation_id=runtime.cid, content="Also README.")
        await send(stack.js, again, "SendMessage")
        await runtime.wait_for(status_reached(S.FINISHED, count=2))

    assert statuses(runtime) == [
        (S.STARTING, ""),
        (S.RUNNING, ""),
        (S.PAUSED, "idle"),
        (S.RUNNING, "user_returned"),
        (S.FINISHED, ""),
        (S.STARTING, ""),
        (S.RUNNING, ""),
        (S.FINISHED, ""),
    ]
    controls = [(e.action, e.reason) for e in runtime.of(RuntimeControlRequested)]  # type: ignore[attr-defined]
    assert controls[:3] == [
        (RuntimeControl.PAUSE, "idle"),
        (RuntimeControl.RESUME, "user_returned"),
        (RuntimeControl.STOP, "idle"),
    ]
    assert len(runtime.of(RuntimeRequested)) == 2  # a new sandbox for the follow-up
    assert len(stack.llm.player.requests) == 3
    last_prompt = [m.get("content") for m in stack.llm.player.requests[-1].body["messages"]]
    assert "main.py" in last_prompt and "Also README." in last_prompt


async def test_a_restarted_session_manager_still_gives_back_an_ended_conversations_sandbox(
    tmp_path: Path,
) -> None:
    script = {"steps": [finish("Nothing to do.")]}
    spec = ConversationSpec(initial_user_msg="Anything?", timeouts=Timeouts(idle_seconds=0.5))
    async with (
        agent_stack(tmp_path, script, time_limit_check_seconds=3600) as stack,
        stack.conversation("lee", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.FINISHED))
        assert not runtime.of(RuntimeControlRequested)  # this instance never checks
        # A new instance recovers the finished conversation because its sandbox is live.
        await stack.manager.stop()  # it hands its partitions back at once
        restarted = msgspec.structs.replace(
            stack.settings, time_limit_check_seconds=0.1, instance_id="restarted"
        )
        async with running_session_manager(restarted):
            await runtime.wait_for(runtime_reached(RuntimeStatus.STOPPED))
    controls = [(e.action, e.reason) for e in runtime.of(RuntimeControlRequested)]  # type: ignore[attr-defined]
    assert controls == [(RuntimeControl.STOP, "idle")]
    assert statuses(runtime)[-1] == (S.FINISHED, "")


async def test_max_duration_stops_a_busy_conversation(tmp_path: Path) -> None:
    timeouts = Timeouts(max_duration_seconds=1.5)
    spec = ConversationSpec(initial_user_msg="Do the demo.", timeouts=timeouts)
    async with (
        agent_stack(tmp_path, None, time_limit_check_seconds=0.1) as stack,
        stack.conversation("kim", spec) as runtime,
    ):
        runtime.hold_commands = True  # a command that never ends
        await runtime.wait_for(runtime_reached(RuntimeStatus.STOPPED))
    assert statuses(runtime)[-1] == (S.STOPPED, "timeout")
    starting, *_, stopped = runtime.of(ConversationStatusChanged)
    assert (stopped.timestamp - starting.timestamp).total_seconds() >= 1.5
    assert len(runtime.of(CmdRunAction)) == 1 and not runtime.of(CmdOutputObservation)
    controls = [(e.action, e.reason) for e in runtime.of(RuntimeControlRequested)]  # type: ignore[attr-defined]
    assert controls == [(RuntimeControl.STOP, "timeout")]


async def test_budget_stops_before_the_fourth_call_and_a_message_raises_it(
    tmp_path: Path,
) -> None:
    script = {
        "steps": [
            *(think(f"thought {i}", FIXED_USAGE) for i in range(3)),
            finish("Within the raised budget.", FIXED_USAGE),
        ]
    }
    spec = ConversationSpec(initial_user_msg="Think a lot.", max_budget_per_task=1)
    priced = SessionManagerSettings(
        llm_model=FIXED_MODEL,
        llm_api_key="scripted",
        llm_input_cost_per_token=FIXED_INPUT_PRICE,
        llm_output_cost_per_token=FIXED_OUTPUT_PRICE,
    )
    async with (
        agent_stack(tmp_path, script, priced) as stack,
        stack.conversation("dana", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.ERROR))
        await asyncio.sleep(0.3)  # time for a 4th call, were one to happen
        assert len(stack.llm.player.requests) == 3
        metrics = runtime.of(LLMMetrics)
        assert [m.cost for m in metrics] == [pytest.approx(0.4, rel=1e-9)] * 3  # type: ignore[attr-defined]
        assert metrics[-1].accumulated_cost == pytest.approx(1.2, rel=1e-9)  # type: ignore[attr-defined]
        (error,) = [e for e in runtime.of(ConversationStatusChanged) if e.status == S.ERROR]  # type: ignore[attr-defined]
        assert error.reason == "budget_exceeded" and error.id > metrics[-1].id  # type: ignore[attr-defined]
        assert agent_states(runtime)[-1] == (A.ERROR, "budget_exceeded")

        # The limit rises by its initial amount ($1 -> $2): the agent continues and finishes.
        more = SendMessage(user_id="dana", conversation_id=runtime.cid, content="Spend more.")
        await send(stack.js, more, "SendMessage")
        await runtime.wait_for(status_reached(S.FINISHED))
        assert len(stack.llm.player.requests) == 4

    for logged, m in zip(stack.llm.player.requests, runtime.of(LLMMetrics), strict=True):
        response = litellm.ModelResponse(**logged.response)
        assert m.cost == litellm.completion_cost(
            completion_response=response, custom_llm_provider="openai"
        )  # type: ignore[attr-defined]
    assert [s for s, _ in statuses(runtime)][-3:] == [S.ERROR, S.RUNNING, S.FINISHED]


async def test_auth_error_is_typed_and_ends_the_conversation_in_error(tmp_path: Path) -> None:
    script = {"steps": [{"error": {"status": 401}}]}
    spec = ConversationSpec(initial_user_msg="Hi.")
    async with (
        agent_stack(tmp_path, script) as stack,
        stack.conversation("erin", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.ERROR))
        assert len(stack.llm.player.requests) == 1  # an auth error is not retried

    (error,) = runtime.of(ErrorObservation)
    assert error.code == "llm_auth"  # type: ignore[attr-defined]
    assert agent_states(runtime)[-1] == (A.ERROR, "llm_auth")
    assert statuses(runtime)[-1] == (S.ERROR, "llm_auth")


async def test_rate_limit_shows_rate_limited_while_backing_off_then_continues(
    tmp_path: Path,
) -> None:
    script = {
        "steps": [{**think("after the limit"), "error": {"status": 429, "times": 2}}, finish()]
    }
    spec = ConversationSpec(initial_user_msg="Hi.")
    async with (
        agent_stack(tmp_path, script, llm_num_retries=3) as stack,
        stack.conversation("finn", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.FINISHED))

    assert [r.status for r in stack.llm.player.requests] == [429, 429, 200, 200]
    kinds = [
        getattr(e, "agent_state", type(e).__name__)
        for e in runtime.events
        if isinstance(e, (AgentStateChanged, LLMMetrics, ThinkAction))
    ]
    assert kinds == [
        A.RUNNING,
        A.RATE_LIMITED,  # once, though two attempts were refused
        A.RUNNING,
        "LLMMetrics",
        "ThinkAction",
        "LLMMetrics",
        A.FINISHED,
    ]
    assert (A.RATE_LIMITED, "llm_rate_limited") in agent_states(runtime)
    assert not runtime.of(ErrorObservation)


async def test_unavailable_model_is_retried_then_reported(tmp_path: Path) -> None:
    script = {"steps": [{"error": {"status": 503}}]}
    spec = ConversationSpec(initial_user_msg="Hi.")
    async with (
        agent_stack(tmp_path, script, llm_num_retries=2) as stack,
        stack.conversation("gail", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.ERROR))

    assert [r.status for r in stack.llm.player.requests] == [503, 503, 503]
    (error,) = runtime.of(ErrorObservation)
    assert error.code == "llm_unavailable"  # type: ignore[attr-defined]
    assert A.RATE_LIMITED not in [s for s, _ in agent_states(runtime)]
    assert agent_states(runtime)[-1] == (A.ERROR, "llm_unavailable")
    assert statuses(runtime)[-1] == (S.ERROR, "llm_unavailable")


CONFIRMATION_SCRIPT = {
    "steps": [
        {
            "tool_calls": [
                {"name": "task_tracker", "arguments": {"command": "plan", "task_list": []}}
            ]
        },
        bash_step("rm -rf build"),
        finish(),
    ]
}


async def test_confirmed_action_runs_only_after_the_user_confirms(tmp_path: Path) -> None:
    spec = ConversationSpec(initial_user_msg="Clean up.", confirmation_mode=True)
    async with (
        agent_stack(tmp_path, CONFIRMATION_SCRIPT) as stack,
        stack.conversation("hana", spec) as runtime,
    ):
        await runtime.wait_for(agent_state_reached(A.AWAITING_USER_CONFIRMATION))
        await asyncio.sleep(0.3)
        # The plan (not risky) ran unasked; the command is only proposed, and nothing ran it.
        assert len(runtime.of(TaskTrackingObservation)) == 1
        assert not runtime.of(CmdRunAction) and not runtime.of(CmdOutputObservation)
        (proposal,) = runtime.of(ActionProposed)
        assert proposal.proposed.command == "rm -rf build"  # type: ignore[attr-defined]
        (request,) = runtime.of(ConfirmationRequested)
        assert request.action_id == proposal.id  # type: ignore[attr-defined]
        assert len(stack.llm.player.requests) == 2

        answer = ConfirmAction(user_id="hana", conversation_id=runtime.cid, confirmed=True)
        await send(stack.js, answer, "ConfirmAction")
        await runtime.wait_for(status_reached(S.FINISHED))

    tail = [
        type(e).__name__ if not isinstance(e, AgentStateChanged) else e.agent_state
        for e in runtime.events
        if e.id > request.id
    ]
    assert tail[:7] == [
        A.AWAITING_USER_CONFIRMATION,
        "ConfirmationGiven",
        A.USER_CONFIRMED,
        A.RUNNING,
        "CmdRunAction",
        "CmdOutputObservation",
        "LLMMetrics",
    ]
    (given,) = runtime.of(ConfirmationGiven)
    assert given.confirmed and given.action_id == proposal.id  # type: ignore[attr-defined]
    (command,) = runtime.of(CmdRunAction)
    assert command.cause == proposal.id and command.command == "rm -rf build"  # type: ignore[attr-defined]
    assert "hello.txt" in tool_results(stack.llm.player.requests[-1].body)[-1]


async def test_rejected_action_never_runs_and_the_agent_waits_for_the_user(
    tmp_path: Path,
) -> None:
    spec = ConversationSpec(initial_user_msg="Clean up.", confirmation_mode=True)
    async with (
        agent_stack(tmp_path, CONFIRMATION_SCRIPT) as stack,
        stack.conversation("ivan", spec) as runtime,
    ):
        await runtime.wait_for(agent_state_reached(A.AWAITING_USER_CONFIRMATION))
        answer = ConfirmAction(user_id="ivan", conversation_id=runtime.cid, confirmed=False)
        await send(stack.js, answer, "ConfirmAction")
        await send(stack.js, answer, "ConfirmAction")  # a second answer changes nothing
        await runtime.wait_for(agent_state_reached(A.USER_REJECTED))
        await asyncio.sleep(0.3)
        assert len(stack.llm.player.requests) == 2  # waiting for the user, not calling the LLM
        assert statuses(runtime)[-1][0] == S.RUNNING

        message = SendMessage(user_id="ivan", conversation_id=runtime.cid, content="Just finish.")
        await send(stack.js, message, "SendMessage")
        await runtime.wait_for(status_reached(S.FINISHED))

    assert not runtime.of(CmdRunAction) and not runtime.of(CmdOutputObservation)
    (given,) = runtime.of(ConfirmationGiven)
    assert not given.confirmed  # type: ignore[attr-defined]
    (rejection,) = runtime.of(ErrorObservation)
    (proposal,) = runtime.of(ActionProposed)
    assert rejection.code == "action_rejected" and rejection.cause == proposal.id  # type: ignore[attr-defined]
    # The LLM is told: the proposed call is answered by a tool result saying it was rejected.
    last = stack.llm.player.requests[-1].body["messages"]
    (call,) = [m for m in last if m["role"] == "assistant" and "rm -rf" in str(m["tool_calls"])]
    result = next(m for m in last if m.get("tool_call_id") == call["tool_calls"][0]["id"])
    assert "rejected" in result["content"]
    assert last[-1] == {"role": "user", "content": "Just finish."}


async def test_stuck_agent_errors_with_reason_stuck_and_a_message_continues(
    tmp_path: Path,
) -> None:
    script = {"steps": [*(bash_step("ls") for _ in range(5)), finish()]}
    spec = ConversationSpec(initial_user_msg="List files.")
    async with (
        agent_stack(tmp_path, script) as stack,
        stack.conversation("jack", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.ERROR))
        assert stack.settings.stuck_repetitions == 4  # the default
        assert len(stack.llm.player.requests) == 4
        (error,) = runtime.of(ErrorObservation)
        assert error.code == "stuck"  # type: ignore[attr-defined]
        assert statuses(runtime)[-1] == (S.ERROR, "stuck")
        assert agent_states(runtime)[-1] == (A.ERROR, "stuck")

        message = SendMessage(user_id="jack", conversation_id=runtime.cid, content="Go on.")
        await send(stack.js, message, "SendMessage")
        await runtime.wait_for(status_reached(S.FINISHED))
    assert len(stack.llm.player.requests) == 6


async def test_long_history_is_condensed_and_the_task_still_finishes(tmp_path: Path) -> None:
    spec = ConversationSpec(initial_user_msg="Set up a hello world workspace, please.")
    async with (
        agent_stack(
            tmp_path, None, llm_max_input_tokens=800, condensation_keep_recent_events=2
        ) as stack,
        stack.conversation("kim", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(S.FINISHED))

    condensations = runtime.of(CondensationAction)
    assert condensations
    first = condensations[0]
    (task,) = [e for e in runtime.events if getattr(e, "content", None) == spec.initial_user_msg]
    assert first.forgotten_start_id > task.id  # type: ignore[attr-defined]
    assert "earlier events were condensed" in first.summary  # type: ignore[attr-defined]
    # Every step was played once, in order, though the model saw a shortened history.
    requests = stack.llm.player.requests
    assert [r.step for r in requests] == list(range(6))
    assert len(runtime.of(AgentFinishAction)) == 1
    condensed_prompt = requests[-1].body["messages"]
    assert condensed_prompt[1] == {"role": "user", "content": spec.initial_user_msg}
    assert any("condensed" in str(m.get("content")) for m in condensed_prompt)
    sent_ids = {c["id"] for m in condensed_prompt for c in m.get("tool_calls") or []}
    assert "call_s0_0" not in sent_ids and "call_s4_0" in sent_ids
    # A condensation is only planned when the whole history would not fit; with it, every
    # prompt fit the limit the model was given.
    for request in requests:
        body = request.body
        assert (
            litellm.token_counter(FIXED_TOKENIZER, messages=body["messages"], tools=body["tools"])
            <= 800
        )


async def test_api_keys_appear_in_no_event_and_no_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    operator_key = "sk-operator-" + uuid.uuid4().hex
    user_key = "sk-user-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    env = {"TASKBUS_LLM_API_KEY": operator_key, "TASKBUS_LLM_MODEL": "openai/scripted"}
    from_env = settings_from_env(SessionManagerSettings, env)
    spec = ConversationSpec(initial_user_msg="Say hi.")
    script = {"steps": [bash_step("echo hi"), finish()]}
    secrets_key = generate_key()
    secrets = SecretBox(secrets_key)
    with ScriptedLLM({"steps": [{"error": {"status": 401}}]}) as refusing:
        async with agent_stack(
            tmp_path, script, from_env, llm_allowed_base_urls=refusing.url, secrets_key=secrets_key
        ) as stack:
            async with stack.conversation("lena", spec) as runtime:
                await runtime.wait_for(status_reached(S.FINISHED))
            # The user's own set (KV settings, its key sealed as the gateway seals it), at an
            # endpoint the operator allows; that endpoint echoes the key back.
            own = UserSettings(
                llm_model="openai/scripted",
                llm_api_key=secrets.seal(user_key, llm_key_context("lena")),
                llm_base_url=refusing.url,
            )
            await send(stack.js, UpdateSettings(user_id="lena", settings=own), "UpdateSettings")
            async with stack.conversation("lena", spec) as refused:
                await runtime.wait_for(status_reached(S.FINISHED))
                await refused.wait_for(status_reached(S.ERROR))
            stored = await stack.js.subscribe(subjects.ALL_EVENTS, ordered_consumer=True)
            payloads = []
            while True:
                try:
                    payloads.append((await stored.next_msg(timeout=0.5)).data)
                except nats.errors.TimeoutError:
                    break
            await stored.unsubscribe()

    # The keys were really used: each reached its endpoint.
    assert {r.authorization for r in stack.llm.player.requests} == {f"Bearer {operator_key}"}
    assert [r.authorization for r in refusing.player.requests] == [f"Bearer {user_key}"]
    assert user_key in refusing.player.requests[0].response["error"]["message"]
    (error,) = refused.of(ErrorObservation)
    assert error.code == "llm_auth"  # type: ignore[attr-defined]

    assert len(payloads) == len(runtime.events) + len(refused.events)
    logged = "\n".join(
        [r.getMessage() + (r.exc_text or "") for r in caplog.records] + list(capfd.readouterr())
    )
    assert "LLM call" in logged  # the failure was logged, without the key
    for key in (operator_key, user_key):
        assert not any(key.encode() in p for p in payloads)
        assert key not in logged


async def test_a_users_endpoint_is_checked_again_before_each_call(tmp_path: Path) -> None:
    """Settings that passed the API once can point somewhere refused by call time (DNS changed,
    the operator shrank the allow-list): the call is refused with a typed error, nothing is
    sent, and the service goes on serving others."""
    spec = ConversationSpec(initial_user_msg="Say hi.")
    with ScriptedLLM({"steps": [finish()]}) as listener:
        # A name entry must resolve to public addresses only; localhost resolves to loopback.
        by_name = listener.url.replace("127.0.0.1", "localhost")
        async with agent_stack(
            tmp_path, {"steps": [finish()]}, llm_allowed_base_urls=f"{by_name},https://x.example"
        ) as stack:
            refused = {
                "rita": (by_name, "resolves to a loopback, private or link-local address"),
                "raul": (listener.url, "is not an LLM endpoint this server allows"),
            }
            for user, (url, why) in refused.items():
                own = UserSettings(llm_model="openai/scripted", llm_base_url=url)
                await send(stack.js, UpdateSettings(user_id=user, settings=own), "UpdateSettings")
                async with stack.conversation(user, spec) as runtime:
                    await runtime.wait_for(status_reached(S.ERROR))
                (error,) = runtime.of(ErrorObservation)
                assert error.code == "llm_endpoint_refused"  # type: ignore[attr-defined]
                assert why in error.content  # type: ignore[attr-defined]
            async with stack.conversation("olga", spec) as runtime:
                await runtime.wait_for(status_reached(S.FINISHED))
    assert listener.player.requests == []
    assert len(stack.llm.player.requests) == 1  # olga's, on the operator's model
