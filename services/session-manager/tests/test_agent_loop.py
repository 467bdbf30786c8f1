"""Session-manager end to end against real NATS, real litellm and the scripted model over HTTP.

The test plays runtime-runner's part (sandbox ready, command and edit observations); the real
runtime is exercised by the cross-service tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import litellm
import nats
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.commands import (
    Command,
    CreateConversation,
    SendMessage,
    encode_command,
)
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.events import (
    AgentFinishAction,
    CmdOutputObservation,
    CmdRunAction,
    ConversationCreated,
    ConversationStatusChanged,
    Event,
    EventSource,
    FileEditAction,
    FileEditObservation,
    LLMMetrics,
    RuntimeRequested,
    RuntimeStatusChanged,
    TaskTrackingAction,
    TaskTrackingObservation,
    UnknownEvent,
    decode_event,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus, RuntimeStatus
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer
from taskbus.devtools.scripted_llm import ScriptedLLM
from taskbus.session_manager.app import running_session_manager
from taskbus.session_manager.service import SessionManager
from taskbus.session_manager.settings import SessionManagerSettings

INPUT_PRICE = 3e-6
OUTPUT_PRICE = 1.5e-5
S = ConversationStatus


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server of this module's own, so other tests' conversations are not recovered."""
    with NatsServer(tmp_path_factory.mktemp("sm-nats")) as server:
        yield server.url


@pytest.fixture(scope="module")
def scripted_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


@pytest.fixture
async def bus(own_nats: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(own_nats)
    js = nc.jetstream()
    await ensure_streams(js)
    yield js
    await nc.drain()


@pytest.fixture
def settings(own_nats: str, scripted_llm: ScriptedLLM) -> SessionManagerSettings:
    return SessionManagerSettings(
        nats_url=own_nats,
        llm_base_url=scripted_llm.url,
        llm_api_key="scripted",
        llm_input_cost_per_token=INPUT_PRICE,
        llm_output_cost_per_token=OUTPUT_PRICE,
        max_running=100,
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
    await js.publish(
        subjects.command_subject(subjects.SESSION_MANAGER, name),
        encode_command(command),
        headers={"Nats-Msg-Id": uuid.uuid4().hex},
    )


Condition = Callable[[list[Event | UnknownEvent]], bool]


def status_reached(status: ConversationStatus, count: int = 1) -> Condition:
    def reached(events: list[Event | UnknownEvent]) -> bool:
        seen = [e for e in events if isinstance(e, ConversationStatusChanged)]
        return sum(e.status == status for e in seen) >= count

    return reached


def statuses(runtime: FakeRuntime) -> list[tuple[str, str]]:
    return [(e.status, e.reason) for e in runtime.of(ConversationStatusChanged)]  # type: ignore[attr-defined]


async def test_demo_task_runs_to_finish_with_priced_steps(
    bus: JetStreamContext, session_manager: SessionManager
) -> None:
    cid = uuid.uuid4().hex
    spec = ConversationSpec(initial_user_msg="Set up a hello world workspace, please.")
    async with fake_runtime(bus, cid) as runtime:
        # A malformed command is dropped without stopping the consumer.
        await bus.publish(
            subjects.command_subject(subjects.SESSION_MANAGER, "CreateConversation"), b"{oops"
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
    # Prompts grow as the history does: each call saw the previous results.
    assert [m.prompt_tokens for m in metrics] == sorted(m.prompt_tokens for m in metrics)  # type: ignore[attr-defined]
    (finish,) = runtime.of(AgentFinishAction)
    assert finish.final_thought == "Created hello.txt and README.md in the workspace."  # type: ignore[attr-defined]


async def test_iteration_limit_errors_and_a_user_message_continues(
    bus: JetStreamContext, session_manager: SessionManager
) -> None:
    cid = uuid.uuid4().hex
    spec = ConversationSpec(initial_user_msg="Do the demo.", max_iterations=2)
    async with fake_runtime(bus, cid) as runtime:
        await send(
            bus,
            CreateConversation(user_id="bob", conversation_id=cid, spec=spec),
            "CreateConversation",
        )
        await runtime.wait_for(status_reached(S.ERROR))
        assert statuses(runtime)[-1] == (S.ERROR, "max_iterations")
        assert len(runtime.of(LLMMetrics)) == 2

        # Another user's message is ignored; the owner's continues for two more iterations.
        intruder = SendMessage(user_id="mallory", conversation_id=cid, content="hijack")
        await send(bus, intruder, "SendMessage")
        message = SendMessage(user_id="bob", conversation_id=cid, content="Please go on.")
        await send(bus, message, "SendMessage")
        await runtime.wait_for(status_reached(S.ERROR, count=2))

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


async def test_a_restarted_session_manager_resumes_without_repeating_steps(
    bus: JetStreamContext, settings: SessionManagerSettings
) -> None:
    cid = uuid.uuid4().hex
    spec = ConversationSpec(initial_user_msg="Do the demo.")
    async with fake_runtime(bus, cid) as runtime:
        runtime.hold_commands = True
        async with running_session_manager(settings):
            create = CreateConversation(user_id="carol", conversation_id=cid, spec=spec)
            await send(bus, create, "CreateConversation")
            await runtime.wait_for(lambda events: any(isinstance(e, CmdRunAction) for e in events))
        # Down while the command runs; its observation arrives while nobody listens.
        await runtime.answer_held()
        await asyncio.sleep(0.2)
        assert not runtime.of(LLMMetrics)[2:]
        async with running_session_manager(settings):
            await runtime.wait_for(status_reached(S.FINISHED))

    assert len(runtime.of(CmdRunAction)) == 1
    assert len(runtime.of(LLMMetrics)) == 6
    assert [type(e).__name__ for e in runtime.events].count("AgentFinishAction") == 1
    assert [e.id for e in runtime.events] == list(range(len(runtime.events)))


def test_settings_defaults_work_on_a_laptop_and_env_overrides_them() -> None:
    default = settings_from_env(SessionManagerSettings, {})
    assert default.llm_model == "openai/scripted"
    assert default.nats_url == "nats://127.0.0.1:4222"
    tuned = settings_from_env(SessionManagerSettings, {"TASKBUS_MAX_RUNNING": "3"})
    assert tuned.max_running == 3
