"""The fold of a conversation's events, and what the loop does next from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from taskbus.contracts.events import (
    AgentFinishAction,
    AgentStateChanged,
    CmdOutputObservation,
    CmdRunAction,
    ConversationCreated,
    ConversationStatusChanged,
    Event,
    EventSource,
    LLMMetrics,
    MessageAction,
    RuntimeRequested,
    RuntimeStatusChanged,
    TaskItem,
    TaskTrackingAction,
    TaskTrackingObservation,
    ThinkAction,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus, RuntimeStatus
from taskbus.session_manager.decide import Step, next_step, start_events
from taskbus.session_manager.state import apply, limit_reached

FoldEvents = Callable[..., Any]
S = ConversationStatus
A = AgentState


def created(**spec: Any) -> ConversationCreated:
    return ConversationCreated(
        conversation_id="c1",
        source=EventSource.USER,
        user_id="u",
        spec=ConversationSpec(initial_user_msg="hi", **spec),
        title="hi",
    )


def status(value: ConversationStatus, reason: str = "") -> ConversationStatusChanged:
    return ConversationStatusChanged(
        conversation_id="c1", source=EventSource.ENVIRONMENT, status=value, reason=reason
    )


def agent(value: AgentState, reason: str = "") -> AgentStateChanged:
    return AgentStateChanged(
        conversation_id="c1", source=EventSource.AGENT, agent_state=value, reason=reason
    )


def user(text: str) -> MessageAction:
    return MessageAction(conversation_id="c1", source=EventSource.USER, content=text)


def metrics(cost: float = 0.5) -> LLMMetrics:
    return LLMMetrics(conversation_id="c1", source=EventSource.AGENT, model="m", cost=cost)


def run(command: str) -> CmdRunAction:
    return CmdRunAction(conversation_id="c1", source=EventSource.AGENT, command=command)


def output(cause: int) -> CmdOutputObservation:
    return CmdOutputObservation(
        conversation_id="c1",
        source=EventSource.ENVIRONMENT,
        cause=cause,
        content="ok",
        command="x",
        exit_code=0,
    )


def ready() -> RuntimeStatusChanged:
    return RuntimeStatusChanged(
        conversation_id="c1",
        source=EventSource.ENVIRONMENT,
        status=RuntimeStatus.READY,
        workspace="/workspace",
    )


def requested() -> RuntimeRequested:
    return RuntimeRequested(conversation_id="c1", source=EventSource.ENVIRONMENT, user_id="u")


def started(**spec: Any) -> list[Event]:
    """The prefix of a conversation whose agent is running."""
    return [
        created(**spec),
        status(S.STARTING),
        user("hi"),
        requested(),
        ready(),
        status(S.RUNNING),
        agent(A.RUNNING),
    ]


def kinds_and_states(step: Step | list[Event]) -> list[tuple[str, str]]:
    assert isinstance(step, list)
    return [
        (e.kind, str(getattr(e, "status", None) or getattr(e, "agent_state", ""))) for e in step
    ]


def test_fold_tracks_status_runtime_cost_and_iterations(fold_events: FoldEvents) -> None:
    state = fold_events(*started(), metrics(0.25), run("ls"), metrics(0.5))
    assert state.status == S.RUNNING
    assert state.agent_state == A.RUNNING
    assert state.workspace == "/workspace"
    assert state.iterations == 2
    assert state.accumulated_cost == pytest.approx(0.75)
    assert state.last_event_id == 9
    assert [e.kind for e in state.history] == ["MessageAction", "CmdRunAction"]


def test_applying_an_event_twice_changes_nothing(fold_events: FoldEvents) -> None:
    state = fold_events(*started(), metrics(0.25))
    again = apply(state, msgspec.structs.replace(metrics(0.25), id=state.last_event_id))
    assert again == state


def test_new_conversation_starts_with_message_and_runtime_request(fold_events: FoldEvents) -> None:
    events = start_events(fold_events(created()))
    assert [e.kind for e in events] == [
        "ConversationStatusChanged",
        "MessageAction",
        "RuntimeRequested",
    ]
    assert isinstance(events[1], MessageAction) and events[1].content == "hi"


def test_restart_after_stop_does_not_repeat_the_initial_message(fold_events: FoldEvents) -> None:
    state = fold_events(*started(), status(S.STOPPED), agent(A.STOPPED), user("again"))
    assert next_step(state) is Step.READMIT
    assert [e.kind for e in start_events(state)] == [
        "ConversationStatusChanged",
        "RuntimeRequested",
    ]


def test_runtime_ready_makes_the_conversation_and_agent_run(fold_events: FoldEvents) -> None:
    state = fold_events(created(), status(S.STARTING), user("hi"), requested())
    assert next_step(state) is Step.WAIT
    step = next_step(apply(state, msgspec.structs.replace(ready(), id=4)))
    assert kinds_and_states(step) == [
        ("ConversationStatusChanged", "RUNNING"),
        ("AgentStateChanged", "running"),
    ]


def test_running_agent_calls_the_llm_then_waits_for_the_observation(
    fold_events: FoldEvents,
) -> None:
    assert next_step(fold_events(*started())) is Step.CALL_LLM
    waiting = fold_events(*started(), metrics(), run("ls"))
    assert next_step(waiting) is Step.WAIT
    answered = fold_events(*started(), metrics(), run("ls"), output(cause=8))
    assert next_step(answered) is Step.CALL_LLM


def test_an_observation_for_another_action_does_not_release_the_wait(
    fold_events: FoldEvents,
) -> None:
    state = fold_events(*started(), metrics(), run("ls"), output(cause=3))
    assert next_step(state) is Step.WAIT


def test_task_tracking_is_answered_by_session_manager(fold_events: FoldEvents) -> None:
    plan = TaskTrackingAction(
        conversation_id="c1",
        source=EventSource.AGENT,
        command="plan",
        task_list=[TaskItem(id="1", title="Write it", status="in_progress")],
    )
    step = next_step(fold_events(*started(), metrics(), plan))
    assert isinstance(step, list)
    (observation,) = step
    assert isinstance(observation, TaskTrackingObservation)
    assert observation.cause == 8
    assert observation.task_list == plan.task_list
    assert "[~] 1. Write it (in_progress)" in observation.content


def test_think_needs_no_answer(fold_events: FoldEvents) -> None:
    think = ThinkAction(conversation_id="c1", source=EventSource.AGENT, thought="hmm")
    assert next_step(fold_events(*started(), metrics(), think)) is Step.CALL_LLM


def test_finish_finishes_agent_then_conversation(fold_events: FoldEvents) -> None:
    finish = AgentFinishAction(conversation_id="c1", source=EventSource.AGENT, final_thought="ok")
    state = fold_events(*started(), metrics(), finish)
    assert kinds_and_states(next_step(state)) == [
        ("AgentStateChanged", "finished"),
        ("ConversationStatusChanged", "FINISHED"),
    ]
    # A crash between the two appends is completed from the log on restart.
    half_done = fold_events(*started(), metrics(), finish, agent(A.FINISHED))
    assert kinds_and_states(next_step(half_done)) == [("ConversationStatusChanged", "FINISHED")]
    done = fold_events(*started(), metrics(), finish, agent(A.FINISHED), status(S.FINISHED))
    assert next_step(done) is Step.WAIT


def test_agent_message_waits_for_the_user_who_wakes_it(fold_events: FoldEvents) -> None:
    question = MessageAction(conversation_id="c1", source=EventSource.AGENT, content="Which?")
    asked = [*started(), metrics(), question]
    assert kinds_and_states(next_step(fold_events(*asked))) == [
        ("AgentStateChanged", "awaiting_user_input")
    ]
    waiting = [*asked, agent(A.AWAITING_USER_INPUT)]
    assert next_step(fold_events(*waiting)) is Step.WAIT
    assert kinds_and_states(next_step(fold_events(*waiting, user("This one")))) == [
        ("AgentStateChanged", "running")
    ]


def test_paused_and_queued_conversations_wait(fold_events: FoldEvents) -> None:
    assert next_step(fold_events(*started(), status(S.PAUSED), agent(A.PAUSED))) is Step.WAIT
    assert next_step(fold_events(created(), status(S.QUEUED))) is Step.WAIT


def test_runtime_failure_while_starting_is_an_error(fold_events: FoldEvents) -> None:
    failed = RuntimeStatusChanged(
        conversation_id="c1",
        source=EventSource.ENVIRONMENT,
        status=RuntimeStatus.ERROR,
        reason="clone_failed",
    )
    state = fold_events(created(), status(S.STARTING), user("hi"), requested(), failed)
    step = next_step(state)
    assert kinds_and_states(step) == [
        ("AgentStateChanged", "error"),
        ("ConversationStatusChanged", "ERROR"),
    ]
    assert isinstance(step, list) and isinstance(step[1], ConversationStatusChanged)
    assert step[1].reason == "clone_failed"


def test_iteration_limit_stops_before_the_next_llm_call(fold_events: FoldEvents) -> None:
    events = [*started(max_iterations=2), metrics(), run("a"), output(8), metrics(), run("b")]
    state = fold_events(*events, output(11))
    assert limit_reached(state) == "max_iterations"
    step = next_step(state)
    assert kinds_and_states(step) == [
        ("AgentStateChanged", "error"),
        ("ConversationStatusChanged", "ERROR"),
    ]
    assert {e.reason for e in step} == {"max_iterations"}  # type: ignore[union-attr]


def test_a_user_message_extends_the_hit_limit_by_its_initial_amount(
    fold_events: FoldEvents,
) -> None:
    hit = [
        *started(max_iterations=2),
        metrics(),
        metrics(),
        agent(A.ERROR, "max_iterations"),
        status(S.ERROR, "max_iterations"),
    ]
    assert next_step(fold_events(*hit)) is Step.WAIT
    continued = fold_events(*hit, user("go on"))
    assert continued.iteration_limit == 4
    assert kinds_and_states(next_step(continued)) == [
        ("ConversationStatusChanged", "RUNNING"),
        ("AgentStateChanged", "running"),
    ]
    resumed = fold_events(*hit, user("go on"), status(S.RUNNING), agent(A.RUNNING))
    assert next_step(resumed) is Step.CALL_LLM


def test_budget_limit_and_its_extension(fold_events: FoldEvents) -> None:
    spent = [*started(max_budget_per_task=1.0), metrics(0.6), metrics(0.6)]
    assert limit_reached(fold_events(*spent)) == "budget_exceeded"
    extended = fold_events(*spent, user("more"))
    assert extended.budget_limit == 2.0
    assert limit_reached(extended) is None


def test_a_message_below_the_limit_does_not_extend_it(fold_events: FoldEvents) -> None:
    state = fold_events(*started(max_iterations=5), metrics(), user("also"))
    assert state.iteration_limit == 5


def test_a_new_sandbox_abandons_the_action_sent_to_the_old_one(fold_events: FoldEvents) -> None:
    state = fold_events(*started(), metrics(), run("sleep 100"), requested())
    assert state.open_action is None
