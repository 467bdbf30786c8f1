"""Task dependencies: the pure decisions (readiness, outcomes, the agent's context, task plans
with `depends_on`), admission's part, and session-manager against real NATS and the scripted
model: a chain runs in order, a failure propagates down it, deletion and restarts are handled."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.commands import (
    CreateConversation,
    DeleteConversation,
    StopConversation,
)
from taskbus.contracts.events import (
    AgentFinishAction,
    AgentStateChanged,
    CmdRunAction,
    CondensationAction,
    ConversationCreated,
    ConversationDeleted,
    ConversationStatusChanged,
    DependenciesResolved,
    ErrorObservation,
    Event,
    EventSource,
    LLMMetrics,
    MessageAction,
    RuntimeRequested,
    TaskItem,
    TaskTrackingAction,
    TaskTrackingObservation,
    UnknownEvent,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.devtools.nats_server import NatsServer
from taskbus.devtools.scripted_llm import ScriptedLLM
from taskbus.session_manager.admission import QUEUE_FULL_REASON
from taskbus.session_manager.admission_desk import AdmissionDesk
from taskbus.session_manager.admission_ledger import AdmissionLedger
from taskbus.session_manager.app import running_session_manager
from taskbus.session_manager.condensation import plan_condensation
from taskbus.session_manager.decide import next_step, status_event
from taskbus.session_manager.dependencies import (
    DEPENDENCY_FAILED,
    INVALID_TASK_PLAN,
    MAX_FINAL_MESSAGE_CHARS,
    WAITING_FOR_DEPENDENCIES,
    dependencies_context,
    plan_problem,
    resolution,
    waits_for_dependencies,
)
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.state import ConversationState, apply, fold
from taskbus.session_manager.tools import TASK_TRACKER, TOOLS, action_from_tool_call

from .conftest import RUNNER_ALIVE, register_fake_runner
from .test_admission_desk import GREEDY, OPERATOR, Log
from .test_agent_loop import FakeRuntime, bash_step, finish, send, status_reached

_S = ConversationStatus
USER = "ada"


# --- pure: readiness and outcomes ----------------------------------------------------------------


def conversation(
    cid: str,
    status: ConversationStatus | None,
    *,
    user_id: str = USER,
    depends_on: Sequence[str] = (),
    said: Sequence[Event] = (),
) -> ConversationState:
    """A conversation's state folded from its creation, what the agent said, and a status."""
    spec = ConversationSpec(initial_user_msg=f"task {cid}", depends_on=list(depends_on))
    events: list[Event] = [
        ConversationCreated(
            conversation_id=cid,
            source=EventSource.USER,
            user_id=user_id,
            spec=spec,
            title=f"Task {cid}",
        ),
        *said,
    ]
    if status is not None:
        events.append(
            ConversationStatusChanged(
                conversation_id=cid, source=EventSource.ENVIRONMENT, status=status
            )
        )
    return fold(cid, [msgspec.structs.replace(e, id=i) for i, e in enumerate(events)])


def finished_saying(cid: str, text: str, user_id: str = USER) -> ConversationState:
    said = AgentFinishAction(conversation_id=cid, source=EventSource.AGENT, final_thought=text)
    return conversation(cid, _S.FINISHED, user_id=user_id, said=[said])


def test_a_dependent_waits_until_every_dependency_finished_then_reads_their_outcomes() -> None:
    b = conversation("b", _S.QUEUED, depends_on=["a1", "a2"])
    a1 = finished_saying("a1", "Parser built in parser.py.")
    assert waits_for_dependencies(b)
    for a2_status in (_S.QUEUED, _S.STARTING, _S.RUNNING, _S.PAUSED):
        assert resolution(b, [a1, conversation("a2", a2_status)]) is None

    resolved = resolution(b, [a1, finished_saying("a2", "Tests pass.")])
    assert resolved is not None and not resolved.failed
    assert [(o.conversation_id, o.status, o.title, o.final_message) for o in resolved.outcomes] == [
        ("a1", _S.FINISHED, "Task a1", "Parser built in parser.py."),
        ("a2", _S.FINISHED, "Task a2", "Tests pass."),
    ]
    # Once the record is in its log it never waits again, whatever its dependencies do later.
    b = apply(b, msgspec.structs.replace(resolved, id=b.last_event_id + 1))
    assert not waits_for_dependencies(b)


@pytest.mark.parametrize("failed_status", [_S.ERROR, _S.STOPPED])
def test_one_dependency_ending_otherwise_fails_the_dependent_at_once(
    failed_status: ConversationStatus,
) -> None:
    b = conversation("b", _S.QUEUED, depends_on=["a1", "a2"])
    resolved = resolution(b, [conversation("a1", _S.RUNNING), conversation("a2", failed_status)])
    assert resolved is not None and resolved.failed
    assert [o.status for o in resolved.outcomes] == [_S.RUNNING, failed_status]


def test_a_deleted_or_foreign_or_unknown_dependency_fails_it_and_discloses_nothing() -> None:
    b = conversation("b", _S.QUEUED, depends_on=["gone", "eve", "never"])
    deleted = apply(
        finished_saying("gone", "secret plan"),
        ConversationDeleted(conversation_id="gone", source=EventSource.USER, id=9),
    )
    foreign = finished_saying("eve", "eve's private result", user_id="eve")
    unknown = ConversationState(conversation_id="never")
    resolved = resolution(b, [deleted, foreign, unknown])
    assert resolved is not None and resolved.failed
    for outcome in resolved.outcomes:
        assert outcome.status == _S.ARCHIVED
        assert outcome.title == "" and outcome.final_message == ""


def test_the_final_message_is_the_agents_last_word_shortened() -> None:
    long = "x" * (MAX_FINAL_MESSAGE_CHARS * 3)
    said: list[Event] = [
        AgentFinishAction(conversation_id="a", source=EventSource.AGENT, final_thought="first"),
        MessageAction(conversation_id="a", source=EventSource.USER, content="more please"),
        MessageAction(conversation_id="a", source=EventSource.AGENT, content=long),
    ]
    b = conversation("b", _S.QUEUED, depends_on=["a"])
    resolved = resolution(b, [conversation("a", _S.FINISHED, said=said)])
    assert resolved is not None
    message = resolved.outcomes[0].final_message
    assert len(message) == MAX_FINAL_MESSAGE_CHARS and message.endswith("…")


def with_outcomes(state: ConversationState, *dependencies: ConversationState) -> ConversationState:
    resolved = resolution(state, list(dependencies))
    assert resolved is not None
    return apply(state, msgspec.structs.replace(resolved, id=state.last_event_id + 1))


def test_the_agent_reads_the_outcomes_in_its_system_prompt_even_after_condensation() -> None:
    b = conversation("b", _S.QUEUED, depends_on=["a"])
    b = with_outcomes(b, finished_saying("a", "The parser lives in parser.py."))
    assert b.dependencies is not None
    context = dependencies_context(b.dependencies)
    assert "'Task a' (conversation a): FINISHED" in context
    assert "The parser lives in parser.py." in context
    # A long run whose middle is condensed away: the outcomes stay in view.
    events: list[Event] = [
        MessageAction(conversation_id="b", source=EventSource.USER, content="task b")
    ]
    events += [
        MessageAction(conversation_id="b", source=EventSource.AGENT, content=f"step {n} " * 50)
        for n in range(40)
    ]
    for event in events:
        b = apply(b, msgspec.structs.replace(event, id=b.last_event_id + 1))

    def size(messages: list[dict[str, Any]]) -> int:
        return len(str(messages))

    condensation = plan_condensation(b, size, max_tokens=size(to_messages(b)) // 2, keep_recent=2)
    assert isinstance(condensation, CondensationAction)
    b = apply(b, msgspec.structs.replace(condensation, id=b.last_event_id + 1))
    assert any(isinstance(e, CondensationAction) for e in b.history)
    system = to_messages(b)[0]
    assert system["role"] == "system"
    assert (
        "<dependencies>" in system["content"]
        and "The parser lives in parser.py." in system["content"]
    )


def test_a_conversation_without_dependencies_has_no_such_context() -> None:
    plain = conversation("p", _S.RUNNING)
    assert not waits_for_dependencies(plain)
    assert "<dependencies>" not in to_messages(plain)[0]["content"]


# --- pure: task plans with depends_on ------------------------------------------------------------


def item(id: str, status: str = "todo", *depends_on: str) -> TaskItem:
    return msgspec.convert(
        {"id": id, "title": f"do {id}", "status": status, "depends_on": list(depends_on)}, TaskItem
    )


@pytest.mark.parametrize(
    "plan,problem",
    [
        ([item("1"), item("1")], "'1' is used twice"),
        ([item("1", "todo", "9")], "'1' depends on '9', which is not in the plan"),
        ([item("1", "todo", "1")], "cycle: 1 -> 1"),
        ([item("1", "todo", "2"), item("2", "todo", "3"), item("3", "todo", "1")], "cycle"),
        ([item("1"), item("2", "done", "1")], "'2' cannot be done while '1'"),
        ([item("1", "in_progress"), item("2", "done", "1")], "is in_progress"),
    ],
)
def test_a_plan_with_an_unknown_id_a_cycle_or_an_early_done_is_refused(
    plan: list[TaskItem], problem: str
) -> None:
    found = plan_problem(plan)
    assert found is not None and problem in found


def test_a_sound_plan_with_dependencies_is_accepted() -> None:
    plan = [item("1", "done"), item("2", "done", "1"), item("3", "in_progress", "1", "2")]
    assert plan_problem(plan) is None
    assert plan_problem([]) is None


def tracked(state: ConversationState, plan: list[TaskItem]) -> tuple[ConversationState, Event]:
    """The state after the agent's plan, and decide's answer to it."""
    action = TaskTrackingAction(
        conversation_id=state.conversation_id,
        source=EventSource.AGENT,
        command="plan",
        task_list=plan,
        id=state.last_event_id + 1,
    )
    state = apply(state, action)
    step = next_step(state)
    assert isinstance(step, list) and len(step) == 1
    answer = msgspec.structs.replace(step[0], id=state.last_event_id + 1)
    return apply(state, answer), answer


def running(cid: str) -> ConversationState:
    state = conversation(cid, _S.RUNNING)
    return apply(
        state,
        AgentStateChanged(
            conversation_id=cid,
            source=EventSource.AGENT,
            agent_state=AgentState.RUNNING,
            id=state.last_event_id + 1,
        ),
    )


def test_the_tracker_refuses_a_bad_plan_with_a_coded_error_and_keeps_the_old_plan() -> None:
    state, answer = tracked(running("t"), [item("1"), item("2", "todo", "1")])
    assert isinstance(answer, TaskTrackingObservation)
    assert "[after 1]" in answer.content
    assert [i.id for i in state.task_list] == ["1", "2"]

    state, answer = tracked(state, [item("1"), item("2", "done", "1")])
    assert isinstance(answer, ErrorObservation) and answer.code == INVALID_TASK_PLAN
    assert answer.cause == answer.id - 1
    assert "'2' cannot be done while '1'" in answer.content
    assert [i.status for i in state.task_list] == ["todo", "todo"]  # not applied
    # The agent sees why, as the tool's result, and may send a corrected plan.
    assert "ERROR: The plan was not applied" in to_messages(state)[-1]["content"]
    state, answer = tracked(state, [item("1", "done"), item("2", "done", "1")])
    assert isinstance(answer, TaskTrackingObservation)
    assert [i.status for i in state.task_list] == ["done", "done"]


def test_the_tracker_tool_offers_depends_on_and_parses_it() -> None:
    tracker = next(t for t in TOOLS if t["function"]["name"] == TASK_TRACKER)
    items = tracker["function"]["parameters"]["properties"]["task_list"]["items"]
    assert items["properties"]["depends_on"]["items"] == {"type": "string"}
    action = action_from_tool_call(
        "t",
        TASK_TRACKER,
        '{"command": "plan", "task_list": [{"id": "1", "title": "a", "status": "todo"},'
        ' {"id": "2", "title": "b", "status": "todo", "depends_on": ["1"]}]}',
        "call_1",
        "",
    )
    assert isinstance(action, TaskTrackingAction)
    assert action.task_list[1].depends_on == ["1"]


# --- admission -----------------------------------------------------------------------------------


async def create_in(desk: AdmissionDesk, cid: str, depends_on: Sequence[str] = ()) -> str | None:
    spec = ConversationSpec(initial_user_msg="go", depends_on=list(depends_on))
    event = ConversationCreated(
        conversation_id=cid, source=EventSource.USER, user_id="greedy", spec=spec, title="t"
    )
    state = apply(ConversationState(conversation_id=cid), msgspec.structs.replace(event, id=0))
    async with desk.lock:
        refused = await desk.start_or_queue(state, [event], new=True)
    return None if refused is None else refused.reason


async def test_waiting_for_dependencies_holds_no_slot_counts_as_queued_and_is_never_admitted(
    ledger: AdmissionLedger,
) -> None:
    log = Log({"greedy": GREEDY})
    settings = msgspec.structs.replace(OPERATOR, max_queued_conversations=2)
    desk = log.desk(settings, ledger)
    assert await create_in(desk, "w1", ["x"]) is None
    assert await create_in(desk, "w2", ["x"]) is None
    assert [log.states[c].status_reason for c in ("w1", "w2")] == [WAITING_FOR_DEPENDENCIES] * 2
    assert await create_in(desk, "w3", ["x"]) == QUEUE_FULL_REASON  # the user's queue is full
    # Free slots everywhere, yet nobody waiting for dependencies is started.
    await desk.admit_waiting()
    assert log.statuses("w1") == [_S.QUEUED] and log.statuses("w2") == [_S.QUEUED]
    assert not any(isinstance(e, RuntimeRequested) for e in log.appended)
    # Stopped and restarted before its dependencies ended, it waits for them again.
    await log.append(
        [status_event(log.states["w1"], _S.STOPPED, "user_stop")], log.states["w1"].last_event_id
    )
    async with desk.lock:
        await desk.start_or_queue(log.states["w1"], [], new=True)
    assert log.statuses("w1") == [_S.QUEUED, _S.STOPPED, _S.QUEUED]
    assert log.states["w1"].status_reason == WAITING_FOR_DEPENDENCIES


# --- session-manager against real NATS and the scripted model ----------------------------------

OUTCOME = "Built the parser; it lives in parser.py."
CHAIN_SCRIPT = {"steps": [bash_step("echo working"), finish(OUTCOME)]}


class World:
    """A nats-server and the scripted model, with the fake runtimes of the test's conversations
    (session-managers come and go: `running_session_manager(world.settings)`)."""

    def __init__(self, js: JetStreamContext, llm: ScriptedLLM, settings: SessionManagerSettings):
        self.js = js
        self.llm = llm
        self.settings = settings
        self.runtime_tasks: list[asyncio.Task[None]] = []

    async def runtimes(self, count: int) -> list[FakeRuntime]:
        """Fake runtimes of `count` new conversations, listening before anything is appended."""
        runtimes = [FakeRuntime(self.js, uuid.uuid4().hex) for _ in range(count)]
        self.runtime_tasks += [asyncio.create_task(r.run()) for r in runtimes]
        await asyncio.sleep(0.1)
        return runtimes

    async def create(self, runtime: FakeRuntime, *depends_on: str, **spec: Any) -> None:
        full = ConversationSpec(
            initial_user_msg=f"task of {runtime.cid}", depends_on=list(depends_on), **spec
        )
        command = CreateConversation(user_id=USER, conversation_id=runtime.cid, spec=full)
        await send(self.js, command, "CreateConversation")
        # As the gateway does, a dependent is created only once its dependencies are recorded:
        # commands of different conversations are handled side by side, in no set order.
        await runtime.wait_for(lambda events: bool(runtime.of(ConversationCreated)))

    def requests_naming(self, cid: str) -> list[dict[str, Any]]:
        """The LLM requests whose system prompt names conversation `cid` as a dependency."""
        return [
            r.body
            for r in self.llm.player.requests
            if f"(conversation {cid})" in r.body["messages"][0]["content"]
        ]


@contextlib.asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    with NatsServer(tmp_path / "nats") as server, ScriptedLLM(CHAIN_SCRIPT) as llm:
        settings = SessionManagerSettings(
            nats_url=server.url,
            llm_base_url=llm.url,
            llm_api_key="scripted",
            max_running=100,
            **RUNNER_ALIVE,
        )
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await register_fake_runner(js)
        here = World(js, llm, settings)
        try:
            yield here
        finally:
            for task in here.runtime_tasks:
                task.cancel()
            await asyncio.gather(*here.runtime_tasks, return_exceptions=True)
            await nc.drain()


def ran_command(events: list[Event | UnknownEvent]) -> bool:
    return any(isinstance(e, CmdRunAction) for e in events)


def statuses_of(runtime: FakeRuntime) -> list[ConversationStatusChanged]:
    return [e for e in runtime.events if isinstance(e, ConversationStatusChanged)]


def waiting(runtime: FakeRuntime) -> bool:
    changes = statuses_of(runtime)
    return bool(changes) and changes[-1].status == _S.QUEUED


def resolved_of(runtime: FakeRuntime) -> DependenciesResolved:
    [resolved] = [e for e in runtime.events if isinstance(e, DependenciesResolved)]
    return resolved


async def test_a_chain_runs_in_order_and_each_agent_reads_the_outcome_before_it(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w, running_session_manager(w.settings):
        a, b, c = await w.runtimes(3)
        a.hold_commands = True  # A runs until its command is answered
        await w.create(a)
        await a.wait_for(ran_command)
        await w.create(b, a.cid)
        await w.create(c, b.cid)
        await b.wait_for(status_reached(_S.QUEUED))
        await c.wait_for(status_reached(_S.QUEUED))
        await asyncio.sleep(0.5)
        for dependent in (b, c):
            assert waiting(dependent) and not dependent.of(RuntimeRequested)
            assert [e.reason for e in statuses_of(dependent)] == [WAITING_FOR_DEPENDENCIES]

        await a.answer_held()
        await c.wait_for(status_reached(_S.FINISHED))
        for dependency, dependent in ((a, b), (b, c)):
            resolved = resolved_of(dependent)
            assert not resolved.failed
            [outcome] = resolved.outcomes
            assert (outcome.conversation_id, outcome.status) == (dependency.cid, _S.FINISHED)
            assert outcome.final_message == OUTCOME
            # Started only after its dependency finished, with the outcome recorded first.
            finished = statuses_of(dependency)[-1]
            assert finished.status == _S.FINISHED
            starting = [e for e in statuses_of(dependent) if e.status == _S.STARTING]
            assert starting and starting[0].timestamp >= finished.timestamp
            assert resolved.id < starting[0].id
            # Every request of the dependent's agent names its dependency's outcome.
            sent = w.requests_naming(dependency.cid)
            assert len(sent) == len(dependent.of(LLMMetrics)) == 2
            assert all(f"task of {dependent.cid}" in str(r["messages"]) for r in sent)
            assert all(OUTCOME in r["messages"][0]["content"] for r in sent)

        # One that depends on conversations that have already finished starts at once.
        (d,) = await w.runtimes(1)
        await w.create(d, a.cid, c.cid)
        await d.wait_for(status_reached(_S.FINISHED))
        assert [o.status for o in resolved_of(d).outcomes] == [_S.FINISHED, _S.FINISHED]


async def test_a_failure_fails_the_whole_chain_with_dependency_failed(tmp_path: Path) -> None:
    async with world(tmp_path) as w, running_session_manager(w.settings):
        a, b, c = await w.runtimes(3)
        a.hold_commands = True
        await w.create(a, max_iterations=1)
        await a.wait_for(ran_command)
        await w.create(b, a.cid)
        await w.create(c, b.cid)
        await c.wait_for(status_reached(_S.QUEUED))

        await a.answer_held()  # then A's iteration limit ends it in ERROR
        await c.wait_for(status_reached(_S.ERROR))
        assert (statuses_of(a)[-1].status, statuses_of(a)[-1].reason) == (
            _S.ERROR,
            "max_iterations",
        )
        for dependency, dependent in ((a, b), (b, c)):
            resolved = resolved_of(dependent)
            assert resolved.failed
            assert [(o.conversation_id, o.status) for o in resolved.outcomes] == [
                (dependency.cid, _S.ERROR)
            ]
            last = statuses_of(dependent)[-1]
            assert (last.status, last.reason) == (_S.ERROR, DEPENDENCY_FAILED)
            assert last.id == resolved.id + 1
            assert not dependent.of(RuntimeRequested)
            assert not w.requests_naming(dependency.cid)

        # Depending on a conversation that has already failed fails at once.
        (d,) = await w.runtimes(1)
        await w.create(d, c.cid)
        await d.wait_for(status_reached(_S.ERROR))
        assert resolved_of(d).failed


async def test_stopping_or_deleting_a_dependency_fails_its_dependents(tmp_path: Path) -> None:
    async with world(tmp_path) as w, running_session_manager(w.settings):
        stopped, deleted, b1, b2 = await w.runtimes(4)
        for dependency, dependent in ((stopped, b1), (deleted, b2)):
            dependency.hold_commands = True
            await w.create(dependency)
            await w.create(dependent, dependency.cid)
            await dependent.wait_for(status_reached(_S.QUEUED))
        stop = StopConversation(user_id=USER, conversation_id=stopped.cid)
        await send(w.js, stop, "StopConversation")
        delete = DeleteConversation(user_id=USER, conversation_id=deleted.cid)
        await send(w.js, delete, "DeleteConversation")
        await b1.wait_for(status_reached(_S.ERROR))
        await b2.wait_for(status_reached(_S.ERROR))
        assert [o.status for o in resolved_of(b1).outcomes] == [_S.STOPPED]
        assert [o.status for o in resolved_of(b2).outcomes] == [_S.ARCHIVED]


async def test_waiting_survives_a_restart_of_session_manager(tmp_path: Path) -> None:
    """Dependents are found again from the log: one whose dependency ended while the service was
    down is decided at start, one whose dependency ends later is still woken by it."""
    async with world(tmp_path) as w:
        early, late, b_early, b_late = await w.runtimes(4)
        async with running_session_manager(w.settings):
            for dependency, dependent in ((early, b_early), (late, b_late)):
                dependency.hold_commands = True
                await w.create(dependency)
                await dependency.wait_for(ran_command)
                await w.create(dependent, dependency.cid)
                await dependent.wait_for(status_reached(_S.QUEUED))
        # While it is down, `early` is stopped (the event a stop appends).
        await EventAppender(w.js).append(
            ConversationStatusChanged(
                conversation_id=early.cid,
                source=EventSource.ENVIRONMENT,
                status=_S.STOPPED,
                reason="user_stop",
            )
        )
        await asyncio.sleep(0.3)
        assert waiting(b_early)
        async with running_session_manager(w.settings):
            await b_early.wait_for(status_reached(_S.ERROR))
            assert resolved_of(b_early).failed
            assert waiting(b_late)
            await late.answer_held()
            await b_late.wait_for(status_reached(_S.FINISHED))
            assert not resolved_of(b_late).failed
