"""The fold of a conversation's events, and what the loop does next from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from taskbus.contracts.events import (
    ActionProposed,
    AgentFinishAction,
    AgentStateChanged,
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
    FileReadAction,
    LLMMetrics,
    MessageAction,
    ResourceUsage,
    RuntimeRequested,
    RuntimeStatusChanged,
    TaskItem,
    TaskTrackingAction,
    TaskTrackingObservation,
    ThinkAction,
    ToolCall,
    ToolCallsQueued,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus, RuntimeStatus
from taskbus.devtools.agent_log import agent_events
from taskbus.session_manager.condensation import plan_condensation
from taskbus.session_manager.decide import Step, as_proposal, next_step, start_events
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.lifecycle import confirmation_events
from taskbus.session_manager.state import (
    ConversationState,
    History,
    apply,
    fold,
    limit_reached,
)
from taskbus.session_manager.stuck import is_stuck

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


def test_a_measurement_moves_the_log_position_but_not_the_decisive_event(
    fold_events: FoldEvents,
) -> None:
    """What a decision rests on (`last_decisive_event_id`) is the last event other than a
    measurement: a sandbox's usage sample after an LLM call's metrics leaves the metrics
    decisive, so the call's action still counts as undisturbed."""
    usage = ResourceUsage(conversation_id="c1", source=EventSource.ENVIRONMENT)
    state = fold_events(*started(), metrics(), usage)
    assert (state.last_event_id, state.last_decisive_event_id) == (8, 7)
    state = apply(state, msgspec.structs.replace(run("ls"), id=9))
    assert (state.last_event_id, state.last_decisive_event_id) == (9, 9)


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


# --- rate limits, confirmation, stuck detection, condensation ---------------------------------


def test_rate_limited_agent_is_still_running_for_the_loop(fold_events: FoldEvents) -> None:
    state = fold_events(*started(), agent(A.RATE_LIMITED, "llm_rate_limited"))
    assert next_step(state) is Step.CALL_LLM  # after a restart mid-backoff, it simply calls again


def edit(command: Any, path: str = "a.py") -> FileEditAction:
    return FileEditAction(
        conversation_id="c1", source=EventSource.AGENT, command=command, path=path
    )


def test_only_actions_that_change_the_sandbox_need_confirmation(fold_events: FoldEvents) -> None:
    careful = fold_events(created(confirmation_mode=True))
    read = FileReadAction(conversation_id="c1", source=EventSource.AGENT, path="a.py")
    for risky in (run("ls"), edit("create"), edit("str_replace"), edit("insert")):
        proposal = as_proposal(careful, risky)
        assert isinstance(proposal, ActionProposed) and proposal.proposed == risky
    thought = ThinkAction(conversation_id="c1", source=EventSource.AGENT, thought="t")
    for safe in (read, edit("view"), thought, finish_action()):
        assert as_proposal(careful, safe) is safe
    command = run("ls")
    assert as_proposal(fold_events(created()), command) is command


def finish_action() -> AgentFinishAction:
    return AgentFinishAction(conversation_id="c1", source=EventSource.AGENT)


def proposed(command: str) -> ActionProposed:
    return ActionProposed(conversation_id="c1", source=EventSource.AGENT, proposed=run(command))


def given(action_id: int, confirmed: bool) -> ConfirmationGiven:
    return ConfirmationGiven(
        conversation_id="c1", source=EventSource.USER, action_id=action_id, confirmed=confirmed
    )


def test_a_proposal_asks_once_then_waits_and_nothing_reaches_the_runtime(
    fold_events: FoldEvents,
) -> None:
    prefix = [*started(confirmation_mode=True), metrics(), proposed("rm -rf x")]
    proposal_id = len(prefix) - 1
    asked = next_step(fold_events(*prefix))
    assert kinds_and_states(asked) == [
        ("ConfirmationRequested", ""),
        ("AgentStateChanged", A.AWAITING_USER_CONFIRMATION),
    ]
    assert isinstance(asked, list) and isinstance(asked[0], ConfirmationRequested)
    assert asked[0].action_id == proposal_id
    waiting = fold_events(*prefix, *asked)
    assert next_step(waiting) is Step.WAIT
    assert waiting.history[-1].kind == "MessageAction"  # the proposal is not in the LLM's view
    # A user message while waiting does not run the action either.
    assert next_step(fold_events(*prefix, *asked, user("hm"))) is Step.WAIT


def test_confirming_appends_the_real_action_caused_by_the_proposal(
    fold_events: FoldEvents,
) -> None:
    prefix = [*started(confirmation_mode=True), metrics(), proposed("make")]
    proposal_id = len(prefix) - 1
    prefix += [*next_step(fold_events(*prefix))]  # type: ignore[misc]
    (answer,) = confirmation_events(fold_events(*prefix), confirmed=True)
    confirmed = [*prefix, answer]
    assert confirmation_events(fold_events(*confirmed), confirmed=False) == []  # answered once
    step = next_step(fold_events(*confirmed))
    assert kinds_and_states(step) == [
        ("AgentStateChanged", A.USER_CONFIRMED),
        ("AgentStateChanged", A.RUNNING),
        ("CmdRunAction", ""),
    ]
    assert isinstance(step, list)
    action = step[-1]
    assert isinstance(action, CmdRunAction) and action.cause == proposal_id
    running = fold_events(*confirmed, *step)
    assert running.pending_action is None
    assert next_step(running) is Step.WAIT  # the runtime runs it now
    # Interrupted after USER_CONFIRMED: only the rest is appended.
    partial = next_step(fold_events(*confirmed, step[0]))
    assert kinds_and_states(partial) == [("AgentStateChanged", A.RUNNING), ("CmdRunAction", "")]


def test_rejecting_answers_the_proposal_for_the_llm_and_waits_for_the_user(
    fold_events: FoldEvents,
) -> None:
    prefix = [*started(confirmation_mode=True), metrics(), proposed("rm -rf x")]
    proposal_id = len(prefix) - 1
    prefix += [*next_step(fold_events(*prefix)), given(proposal_id, confirmed=False)]  # type: ignore[misc]
    step = next_step(fold_events(*prefix))
    assert kinds_and_states(step) == [
        ("AgentStateChanged", A.USER_REJECTED),
        ("ErrorObservation", ""),
    ]
    rejected = fold_events(*prefix, *step)  # type: ignore[misc]
    assert rejected.pending_action is None
    assert next_step(rejected) is Step.WAIT
    messages = to_messages(rejected)
    assert messages[-2]["tool_calls"][0]["function"]["name"] == "execute_bash"
    assert messages[-1]["role"] == "tool" and "rejected" in messages[-1]["content"]
    answered = next_step(fold_events(*prefix, *step, user("do X instead")))  # type: ignore[misc]
    assert kinds_and_states(answered) == [("AgentStateChanged", A.RUNNING)]


def queued(*calls: tuple[str, dict[str, Any] | str]) -> ToolCallsQueued:
    """One LLM response's several tool calls; a str stands for malformed argument text."""
    return ToolCallsQueued(
        conversation_id="c1",
        source=EventSource.AGENT,
        thought="Several things at once.",
        calls=[
            ToolCall(
                id=f"toolu_{n}",
                name=name,
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
            )
            for n, (name, arguments) in enumerate(calls)
        ],
    )


def play(fold_events: FoldEvents, events: list[Event]) -> list[Event]:
    """Append what the loop decides and play the runner (answer commands and resumes), until the
    loop would call the LLM or has nothing to do."""
    events = list(events)
    for _ in range(50):
        state = fold_events(*events)
        step = next_step(state)
        if isinstance(step, list):
            events += step
        elif step is Step.WAIT and isinstance(state.open_action, CmdRunAction):
            events.append(output(cause=state.open_action.id))
        elif step is Step.WAIT and state.pending_resume_id is not None:
            events.append(ready())  # the runner unpaused the sandbox
        else:
            return events
    raise AssertionError("the loop never settled")


def test_several_tool_calls_of_one_response_run_one_at_a_time_in_order(
    fold_events: FoldEvents,
) -> None:
    calls = queued(
        ("task_tracker", {"command": "plan", "task_list": [{"id": "1", "title": "Look"}]}),
        ("execute_bash", {"command": "ls"}),
        ("execute_bash", "{not json"),
        ("think", {"thought": "Now pwd."}),
        ("execute_bash", {"command": "pwd"}),
    )
    prefix = [*started(), metrics(), calls]
    queue_id = len(prefix) - 1
    # The first call is released at once; the LLM is not called while calls remain.
    first = next_step(fold_events(*prefix))
    assert isinstance(first, list) and len(first) == 1
    assert isinstance(first[0], TaskTrackingAction)
    assert (first[0].cause, first[0].tool_call_id) == (queue_id, "toolu_0")
    assert first[0].thought == "Several things at once."
    released_one = fold_events(*prefix, *first)
    assert released_one.tool_calls_released == 1 and released_one.tool_queue is not None

    played = play(fold_events, prefix)
    state = fold_events(*played)
    assert next_step(state) is Step.CALL_LLM and state.tool_queue is None
    assert state.iterations == 1  # one LLM call, five tool calls
    after = played[len(prefix) :]
    assert [e.kind for e in after] == [
        "TaskTrackingAction",
        "TaskTrackingObservation",
        "CmdRunAction",
        "CmdOutputObservation",
        "ErrorObservation",
        "ThinkAction",
        "CmdRunAction",
        "CmdOutputObservation",
    ]
    released = [e for e in after if e.cause == queue_id]
    assert [getattr(e, "tool_call_id", None) for e in released] == [
        "toolu_0",
        "toolu_1",
        None,
        "toolu_3",
        "toolu_4",
    ]
    assert [getattr(e, "thought", "") for e in released[1:]] == ["", "", "Now pwd.", ""]
    error = after[4]
    assert isinstance(error, ErrorObservation) and error.code == "invalid_tool_call"
    assert "execute_bash" in error.content
    # The LLM sees each released call answered in turn, the malformed one as an error.
    messages = to_messages(state)[2:]
    assert [m["role"] for m in messages] == [
        "assistant",
        "tool",
        "assistant",
        "tool",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
    ]
    ids = [m["tool_calls"][0]["id"] for m in messages if m["role"] == "assistant"]
    assert ids == ["toolu_0", "toolu_1", "toolu_3", "toolu_4"]
    assert [m["tool_call_id"] for m in messages if m["role"] == "tool"] == [*ids]


def test_queued_calls_are_dropped_when_the_agent_finishes_or_is_stopped(
    fold_events: FoldEvents,
) -> None:
    finish_first = queued(("finish", {"message": "Done."}), ("execute_bash", {"command": "ls"}))
    played = play(fold_events, [*started(), metrics(), finish_first])
    assert [e.kind for e in played[-3:]] == [
        "AgentFinishAction",
        "AgentStateChanged",
        "ConversationStatusChanged",
    ]
    assert fold_events(*played).tool_queue is None
    assert not any(isinstance(e, CmdRunAction) for e in played)

    two_commands = queued(("execute_bash", {"command": "a"}), ("execute_bash", {"command": "b"}))
    prefix = [*started(), metrics(), two_commands]
    prefix += next_step(fold_events(*prefix))  # type: ignore[arg-type]
    stopped = fold_events(*prefix, status(S.STOPPED), agent(A.STOPPED))
    assert stopped.tool_queue is None
    # Asked to go on later, the agent asks the LLM again instead of running the stale "b".
    resumed = play(fold_events, [*prefix, status(S.STOPPED), agent(A.STOPPED), user("go on")])
    assert next_step(fold_events(*resumed)) is Step.READMIT


def test_queued_risky_calls_are_proposed_and_a_rejection_drops_the_rest(
    fold_events: FoldEvents,
) -> None:
    calls = queued(("execute_bash", {"command": "rm -rf x"}), ("execute_bash", {"command": "b"}))
    prefix = [*started(confirmation_mode=True), metrics(), calls]
    (proposal,) = next_step(fold_events(*prefix))  # type: ignore[misc]
    assert isinstance(proposal, ActionProposed) and proposal.cause == len(prefix) - 1
    prefix.append(proposal)
    asked = next_step(fold_events(*prefix))
    assert kinds_and_states(asked) == [
        ("ConfirmationRequested", ""),
        ("AgentStateChanged", A.AWAITING_USER_CONFIRMATION),
    ]
    prefix += [*asked, given(len(prefix) - 1, confirmed=False)]  # type: ignore[misc]
    rejected = play(fold_events, prefix)
    state = fold_events(*rejected)
    assert state.agent_state == A.USER_REJECTED and state.tool_queue is None
    assert next_step(state) is Step.WAIT
    assert not any(isinstance(e, CmdRunAction) for e in rejected)


def test_stuck_means_the_same_call_and_result_repeatedly_since_the_user_spoke(
    fold_events: FoldEvents,
) -> None:
    events = list(started())
    for _ in range(3):
        events += [run("ls"), output(len(events))]
    assert not is_stuck(fold_events(*events), 4)
    events += [run("ls"), output(len(events))]
    assert is_stuck(fold_events(*events), 4)
    assert not is_stuck(fold_events(*events, user("try again")), 4)
    varied = [*events[:-2], run("ls -a"), output(len(events) - 2)]
    assert not is_stuck(fold_events(*varied), 4)


def _chars(messages: list[dict[str, Any]]) -> int:
    """A stand-in tokenizer: one token per ten characters."""
    return sum(len(str(m)) for m in messages) // 10


def test_condensation_keeps_the_task_and_recent_events_and_replaces_the_middle(
    fold_events: FoldEvents,
) -> None:
    events = list(started())
    for i in range(8):
        events += [run(f"echo {i} " + "x" * 200), output(len(events))]
    state = fold_events(*events)
    assert plan_condensation(state, _chars, max_tokens=10_000, keep_recent=2) is None
    size = _chars(to_messages(state))
    condensation = plan_condensation(state, _chars, max_tokens=size - 1, keep_recent=2)
    assert condensation is not None
    first_action = started().__len__()
    assert condensation.forgotten_start_id == first_action  # right after the task message
    assert "echo 0" in condensation.summary and "(exit code 0)" in condensation.summary
    after = fold_events(*events, condensation)
    kinds = [e.kind for e in after.history]
    assert kinds[:2] == ["MessageAction", "CondensationAction"]
    assert _chars(to_messages(after)) <= (size - 1) // 2 or kinds[2:] == [
        "CmdRunAction",
        "CmdOutputObservation",
    ]
    assert after.history[-1] == state.history[-1]

    # A second condensation absorbs the first: its range starts where the first did.
    more = [*events, condensation]
    for i in range(4):
        more += [run(f"echo again {i} " + "y" * 200), output(len(more))]
    grown = fold_events(*more)
    second = plan_condensation(grown, _chars, _chars(to_messages(grown)) - 1, keep_recent=2)
    assert second is not None
    assert second.forgotten_start_id == condensation.forgotten_start_id
    assert "echo 0" in second.summary
    assert [e.kind for e in fold_events(*more, second).history].count("CondensationAction") == 1


def test_nothing_to_forget_means_no_condensation(fold_events: FoldEvents) -> None:
    state = fold_events(*started(), run("ls"), output(len(started())))
    assert plan_condensation(state, _chars, max_tokens=1, keep_recent=2) is None


def test_condensation_event_round_trip_in_the_fold_is_idempotent(fold_events: FoldEvents) -> None:
    events = [*started(), run("a"), output(7), run("b"), output(9), run("c"), output(11)]
    forget = CondensationAction(
        conversation_id="c1",
        source=EventSource.AGENT,
        forgotten_start_id=7,
        forgotten_end_id=10,
        summary="s",
    )
    state = fold_events(*events, forget)
    assert [e.id for e in state.history] == [2, 13, 11, 12]
    assert apply(state, msgspec.structs.replace(forget, id=13)) == state


def test_old_states_never_change_as_later_ones_append() -> None:
    """Successive states share one history list (appending costs O(1), not a copy of the
    history: bench/history_bench.py shows the cost flat): a state folded further, or branched,
    leaves older ones as they were."""
    events = agent_events("c1", 1_000)
    state = fold("c1", events[:400])
    before = list(state.history)
    later = state
    for event in events[400:]:
        later = apply(later, event)
    assert list(state.history) == before
    said = MessageAction(conversation_id="c1", source=EventSource.USER, id=400, content="hi")
    branch = apply(state, said)
    assert list(state.history) == before and list(branch.history) == [*before, branch.history[-1]]
    twice = apply(branch, msgspec.structs.replace(said, id=401, content="again"))
    assert list(branch.history) == [*before, said] and len(twice.history) == len(before) + 2
    assert later == fold("c1", events) and later.history != branch.history
    assert len(later.history) < len(events)  # condensed along the way
    assert History([*later.history]) == later.history == tuple(later.history)
    assert list(reversed(later.history)) == list(later.history)[::-1]
    assert later.history[-1] == list(later.history)[-1]
    assert later.history[1:3] == tuple(list(later.history)[1:3])
    with pytest.raises(IndexError):
        later.history[len(later.history)]
    assert not ConversationState(conversation_id="c2").history  # the shared default stays empty
