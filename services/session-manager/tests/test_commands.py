"""Commands against the contracts' one transition table, checked exhaustively: every verdict is
the table's, every status change `decide` (and the lifecycle and time limits) can emit is in the
table, and the seed's semantics (user defaults, a message answering a confirmation, priority
in eviction, ERROR -> cleanup -> STOPPED) hold."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from taskbus.contracts.commands import (
    NOT_FOUND,
    ConfirmAction,
    ConversationCommand,
    DeleteConversation,
    PauseConversation,
    RenameConversation,
    ResumeConversation,
    SendMessage,
    StartConversation,
    StopConversation,
)
from taskbus.contracts.events import (
    ActionProposed,
    AgentFinishAction,
    CmdRunAction,
    ConfirmationGiven,
    ConversationRenamed,
    ConversationStatusChanged,
    ErrorObservation,
    Event,
    EventSource,
    MessageAction,
    RuntimeControl,
    RuntimeControlRequested,
    TaskTrackingAction,
)
from taskbus.contracts.specs import ConcurrencyPolicy, ConversationSpec, Timeouts, UserSettings
from taskbus.contracts.status import (
    COMMAND_TRANSITIONS,
    INITIAL_STATUSES,
    TRANSITIONS,
    AgentState,
    Control,
    ConversationStatus,
    RuntimeStatus,
    command_target,
)
from taskbus.session_manager.admission import (
    EVICTION_REASON,
    Admit,
    Queue,
    Running,
    UserLimits,
    Waiting,
    admit,
    admit_waiting,
)
from taskbus.session_manager.commands import (
    INVALID_TRANSITION,
    NOTHING_TO_CONFIRM,
    Accept,
    Refuse,
    command_verdict,
    may_have_a_verdict,
    verdict,
)
from taskbus.session_manager.decide import IDLE_REASON, Step, is_settled, next_step
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.lifecycle import (
    delete_events,
    pause_events,
    resume_events,
    stop_events,
)
from taskbus.session_manager.service import effective_spec
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.state import ConversationState, apply
from taskbus.session_manager.time_limits import CLEANUP_REASON, time_limit_events

from .conftest import CID, FoldEvents
from .test_state import A, S, agent, metrics, proposed, started, status

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALL_STATUSES = list(ConversationStatus)

# --- the table itself --------------------------------------------------------------------------


def test_every_command_move_is_a_transition_of_the_table() -> None:
    for control, row in COMMAND_TRANSITIONS.items():
        for current, target in row.items():
            assert target == current or target in TRANSITIONS[current], (control, current)


def test_finished_stays_finished_and_ended_conversations_neither_pause_nor_resume() -> None:
    assert S.STOPPED not in TRANSITIONS[S.FINISHED]
    for ended in (S.FINISHED, S.STOPPED, S.ERROR, S.ARCHIVED):
        assert command_target(Control.PAUSE, ended) is None
        assert command_target(Control.RESUME, ended) is None
    assert command_target(Control.STOP, S.FINISHED) is None


# --- verdicts ----------------------------------------------------------------------------------

PENDING = ActionProposed(
    conversation_id=CID,
    source=EventSource.AGENT,
    id=7,
    proposed=CmdRunAction(conversation_id=CID, source=EventSource.AGENT, command="rm -rf x"),
)


def state_in(current: ConversationStatus, *, awaiting: bool = False) -> ConversationState:
    """A conversation of user `u` in `current`, with a ready sandbox where it may have one;
    `awaiting`: a risky action waits for the user's answer."""
    reason = IDLE_REASON if current == S.PAUSED else ""
    return ConversationState(
        conversation_id=CID,
        created=True,
        user_id="u",
        last_event_id=9,
        status=current,
        status_reason=reason,
        deleted=current == S.ARCHIVED,
        agent_state=A.AWAITING_USER_CONFIRMATION if awaiting else A.RUNNING,
        runtime_status=RuntimeStatus.READY,
        pending_action=PENDING if awaiting else None,
    )


def commands_of(control: Control) -> list[ConversationCommand]:
    ids = {"user_id": "u", "conversation_id": CID, "command_id": "k1"}
    match control:
        case Control.START:
            return [StartConversation(**ids)]
        case Control.STOP:
            return [StopConversation(**ids)]
        case Control.PAUSE:
            return [PauseConversation(**ids)]
        case Control.RESUME:
            return [ResumeConversation(**ids)]
        case Control.MESSAGE:
            return [SendMessage(**ids, content="hello")]
        case Control.CONFIRM:
            return [ConfirmAction(**ids, confirmed=True), ConfirmAction(**ids, confirmed=False)]
        case Control.DELETE:
            return [DeleteConversation(**ids)]
        case Control.RENAME:
            return [RenameConversation(**ids, title="New title")]


@pytest.mark.parametrize("control", list(Control))
@pytest.mark.parametrize("current", ALL_STATUSES)
def test_each_command_in_each_status_is_accepted_exactly_as_the_table_says(
    control: Control, current: ConversationStatus
) -> None:
    allowed = command_target(control, current) is not None
    for command in commands_of(control):
        state = state_in(current, awaiting=control == Control.CONFIRM)
        decision = verdict(state, command)
        assert isinstance(decision, Accept) == allowed, (control, current, decision)
        if isinstance(decision, Refuse):
            if current == S.ARCHIVED:  # deleted means gone: a 404, not a 409
                assert decision.reason == NOT_FOUND
                continue
            assert decision.reason == INVALID_TRANSITION
            assert str(current) in decision.detail
            continue
        target = command_target(control, current)
        changes = [e.status for e in decision.events if isinstance(e, ConversationStatusChanged)]
        assert changes == ([] if target == current else [target]) or decision.admit


def test_a_rename_appends_the_title_in_any_status_but_deleted() -> None:
    command = RenameConversation(user_id="u", conversation_id=CID, title="Renamed")
    decision = verdict(state_in(S.FINISHED), command)
    assert isinstance(decision, Accept) and not decision.admit
    assert [(type(e), e.title) for e in decision.events if isinstance(e, ConversationRenamed)] == [
        (ConversationRenamed, "Renamed")
    ]
    assert len(decision.events) == 1  # nothing else: a rename changes no status
    renamed = msgspec.structs.replace(decision.events[0], id=10)
    assert apply(state_in(S.FINISHED), renamed).title == "Renamed"
    assert isinstance(verdict(state_in(S.ARCHIVED), command), Refuse)


def test_confirm_needs_an_action_awaiting_the_answer() -> None:
    command = ConfirmAction(user_id="u", conversation_id=CID, confirmed=True)
    decision = verdict(state_in(S.RUNNING), command)
    assert decision == Refuse(
        reason=NOTHING_TO_CONFIRM, detail="no action is awaiting confirmation"
    )


@pytest.mark.parametrize("control", list(Control))
def test_a_deleted_conversation_is_not_found_to_every_command_and_tells_nothing(
    control: Control,
) -> None:
    """The gateway asks no one before it publishes a command: this verdict is its 404."""
    for command in commands_of(control):
        decision = verdict(state_in(S.ARCHIVED), command)
        assert decision == Refuse(reason=NOT_FOUND, detail=f"conversation {CID!r} not found")
        told = command_verdict(command, state_in(S.ARCHIVED), decision)
        assert told is not None and told.status is None and told.last_event_id == -1


def test_only_a_fresh_command_id_on_its_first_delivery_skips_the_earlier_verdict() -> None:
    keyed = SendMessage(user_id="u", conversation_id=CID, command_id="k1", content="hi")
    fresh = msgspec.structs.replace(keyed, fresh_id=True)
    assert may_have_a_verdict(keyed, redelivered=False)  # a retry past the dedupe window
    assert may_have_a_verdict(keyed, redelivered=True)
    assert may_have_a_verdict(fresh, redelivered=True)  # a crash between verdict and ack
    assert not may_have_a_verdict(fresh, redelivered=False)
    unanswered = msgspec.structs.replace(keyed, command_id=None)
    assert not may_have_a_verdict(unanswered, redelivered=True)  # nobody waits for one


def test_another_users_or_an_unknown_conversation_is_not_found_and_tells_nothing() -> None:
    command = PauseConversation(user_id="intruder", conversation_id=CID, command_id="k1")
    state = state_in(S.RUNNING)
    decision = verdict(state, command)
    assert isinstance(decision, Refuse) and decision.reason == NOT_FOUND
    told = command_verdict(command, state, decision)
    assert told is not None and told.status is None and told.last_event_id == -1
    unknown = ConversationState(conversation_id=CID)
    assert verdict(unknown, msgspec.structs.replace(command, user_id="u")) == decision


def test_the_verdict_tells_the_status_after_an_accepted_command_or_the_current_one() -> None:
    command = StopConversation(user_id="u", conversation_id=CID, command_id="k1")
    after = msgspec.structs.replace(state_in(S.STOPPED), last_event_id=12)
    told = command_verdict(command, after, Accept(events=()))
    assert told is not None and told.accepted and told.status == S.STOPPED
    assert told.last_event_id == 12
    refused = verdict(state_in(S.FINISHED), command)
    told = command_verdict(command, state_in(S.FINISHED), refused)
    assert told is not None and not told.accepted and told.status == S.FINISHED
    assert told.reason == INVALID_TRANSITION
    assert (
        command_verdict(msgspec.structs.replace(command, command_id=None), after, refused) is None
    )


def test_a_command_id_must_be_a_safe_subject_token() -> None:
    encoded = msgspec.json.encode(
        {"command": "StopConversation", "user_id": "u", "conversation_id": CID, "command_id": "a.>"}
    )
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(encoded, type=StopConversation)


# --- every status change decide can emit is in the table ----------------------------------------

OPEN_ACTIONS: list[Event | None] = [
    None,
    CmdRunAction(conversation_id=CID, source=EventSource.AGENT, id=5, command="ls"),
    TaskTrackingAction(conversation_id=CID, source=EventSource.AGENT, id=5, command="view"),
    AgentFinishAction(conversation_id=CID, source=EventSource.AGENT, id=5),
    MessageAction(conversation_id=CID, source=EventSource.AGENT, id=5, content="?"),
]


def every_state() -> Iterator[ConversationState]:
    """Every combination of what `decide` reads, most of them unreachable: a superset is fine."""
    base = ConversationState(
        conversation_id=CID,
        created=True,
        user_id="u",
        last_event_id=20,
        last_activity=T0,
        started_at=T0,
        spec=ConversationSpec(
            confirmation_mode=True,
            max_iterations=3,
            timeouts=Timeouts(idle_seconds=60, max_duration_seconds=600),
        ),
        iteration_limit=3,
    )
    for (
        current,
        agent_state,
        runtime,
        (pending, confirmation),
        user_waiting,
        open_action,
        reason,
        iterations,
        resuming,
    ) in itertools.product(
        [None, *ConversationStatus],
        [None, *AgentState],
        [None, *RuntimeStatus],
        [(None, None), (PENDING, None), (PENDING, True), (PENDING, False)],
        [False, True],
        OPEN_ACTIONS,
        ["", IDLE_REASON],
        [0, 3],
        [None, 19],
    ):
        yield msgspec.structs.replace(
            base,
            status=current,
            status_reason=reason,
            deleted=current == S.ARCHIVED,
            agent_state=agent_state,
            agent_state_event_id=10,
            runtime_status=runtime,
            pending_action=pending,
            confirmation=confirmation,
            last_user_message_id=15 if user_waiting else 3,
            open_action=open_action,
            iterations=iterations,
            pending_resume_id=resuming,
        )


def assert_in_table(current: ConversationStatus | None, events: list[Event]) -> None:
    for event in events:
        if isinstance(event, ConversationStatusChanged):
            allowed = INITIAL_STATUSES if current is None else TRANSITIONS[current]
            assert event.status in allowed, f"{current} -> {event.status}"
            current = event.status


def test_every_status_change_decide_and_the_lifecycle_can_emit_is_in_the_table() -> None:
    later = T0 + timedelta(days=1)
    checked = 0
    for state in every_state():
        step = next_step(state)
        if isinstance(step, list):
            assert_in_table(state.status, step)
        elif step is Step.READMIT:
            assert state.status is not None
            # Admission starts it or makes it wait.
            assert {S.STARTING, S.QUEUED} <= TRANSITIONS[state.status]
        assert_in_table(state.status, time_limit_events(state, later))
        for events in (
            stop_events(state, "user_stop"),
            pause_events(state),
            resume_events(state),
            delete_events(state),
        ):
            assert_in_table(state.status, events)
        checked += 1
    assert checked > 100_000


# --- seed semantics ------------------------------------------------------------------------------

OPERATOR = SessionManagerSettings()


def test_users_no_change_timeout_and_confirmation_mode_apply_unless_the_request_overrides() -> None:
    user_settings = UserSettings(no_change_timeout_seconds=7, confirmation_mode=True)
    applied = effective_spec(ConversationSpec(), user_settings, OPERATOR)
    assert applied.timeouts.no_change_seconds == 7
    assert applied.confirmation_mode is True
    own = ConversationSpec(confirmation_mode=False, timeouts=Timeouts(no_change_seconds=3))
    overridden = effective_spec(own, user_settings, OPERATOR)
    assert overridden.timeouts.no_change_seconds == 3
    assert overridden.confirmation_mode is False
    default = effective_spec(ConversationSpec(), None, OPERATOR)
    assert default.confirmation_mode is False and default.timeouts.no_change_seconds is None


def test_a_message_while_awaiting_confirmation_rejects_the_action_and_the_agent_goes_on(
    fold_events: FoldEvents,
) -> None:
    prefix = [*started(confirmation_mode=True), metrics(), proposed("rm -rf x")]
    proposal_id = len(prefix) - 1
    prefix += next_step(fold_events(*prefix))  # type: ignore[arg-type]
    waiting = fold_events(*prefix)
    assert waiting.agent_state == A.AWAITING_USER_CONFIRMATION
    command = SendMessage(user_id="u", conversation_id=CID, content="no, list the files first")
    decision = verdict(waiting, command)
    assert isinstance(decision, Accept)
    given, message = decision.events
    assert isinstance(given, ConfirmationGiven) and not given.confirmed
    assert given.action_id == proposal_id and given.reason == command.content
    assert isinstance(message, MessageAction) and message.content == command.content
    log = [*prefix, *decision.events]
    step = next_step(fold_events(*log))
    assert isinstance(step, list)
    assert [(e.kind, getattr(e, "agent_state", "")) for e in step] == [
        ("AgentStateChanged", A.USER_REJECTED),
        ("ErrorObservation", ""),
        ("AgentStateChanged", A.RUNNING),
    ]
    rejection = step[1]
    assert isinstance(rejection, ErrorObservation) and rejection.cause == proposal_id
    answered = fold_events(*log, *step)
    assert answered.pending_action is None
    assert next_step(answered) is Step.CALL_LLM  # never waits silently
    messages = to_messages(answered)
    assert messages[-3]["tool_calls"][0]["function"]["name"] == "execute_bash"
    assert messages[-2]["role"] == "tool" and "not run" in messages[-2]["content"]
    assert messages[-1] == {"role": "user", "content": command.content}


def test_an_explicit_reject_still_waits_for_the_user(fold_events: FoldEvents) -> None:
    prefix = [*started(confirmation_mode=True), metrics(), proposed("rm -rf x")]
    prefix += next_step(fold_events(*prefix))  # type: ignore[arg-type]
    reject = ConfirmAction(user_id="u", conversation_id=CID, confirmed=False)
    decision = verdict(fold_events(*prefix), reject)
    assert isinstance(decision, Accept)
    log = [*prefix, *decision.events]
    step = next_step(fold_events(*log))
    assert isinstance(step, list)
    assert next_step(fold_events(*log, *step)) is Step.WAIT


LIMITS = UserLimits(max_concurrent=2, policy=ConcurrencyPolicy.EVICT_OLDEST, max_queued=3)


def running(cid: str, minutes: int, priority: int) -> Running:
    return Running(
        conversation_id=cid,
        user_id="u",
        last_activity=T0 + timedelta(minutes=minutes),
        priority=priority,
    )


def test_eviction_never_stops_a_higher_priority_conversation_for_a_lower_one() -> None:
    important = [running("a", 0, 10), running("b", 1, 10)]
    assert admit("u", important, LIMITS, 8, priority=0) == Queue(reason=EVICTION_REASON)
    assert admit("u", important, LIMITS, 8, priority=10) == Admit(evict=("a",))
    mixed = [running("old-important", 0, 10), running("recent-minor", 5, 0)]
    assert admit("u", mixed, LIMITS, 8, priority=5) == Admit(evict=("recent-minor",))
    wait = [
        Waiting(conversation_id="w", user_id="u", priority=0, since=T0),
    ]
    assert admit_waiting(wait, important, lambda _: LIMITS, 8, T0) == []


def test_an_error_conversation_is_cleaned_up_to_stopped_after_its_idle_limit(
    fold_events: FoldEvents,
) -> None:
    failed = fold_events(
        *started(timeouts=Timeouts(idle_seconds=60)),
        status(S.RUNNING),
        agent(A.ERROR, "max_iterations"),
        status(S.ERROR, "max_iterations"),
    )
    failed = msgspec.structs.replace(failed, runtime_status=RuntimeStatus.READY, last_activity=T0)
    assert not is_settled(failed)  # watched until it is cleaned up
    assert time_limit_events(failed, T0 + timedelta(seconds=59)) == []
    events = time_limit_events(failed, T0 + timedelta(seconds=60))
    changes = [(e.status, e.reason) for e in events if isinstance(e, ConversationStatusChanged)]
    assert changes == [(S.STOPPED, CLEANUP_REASON)]
    controls = [e for e in events if isinstance(e, RuntimeControlRequested)]
    assert [(c.action, c.reason) for c in controls] == [(RuntimeControl.STOP, CLEANUP_REASON)]
    cleaned = fold_events(
        *started(timeouts=Timeouts(idle_seconds=60)),
        status(S.RUNNING),
        status(S.ERROR, "max_iterations"),
        *events,
    )
    assert cleaned.status == S.STOPPED and time_limit_events(cleaned, T0 + timedelta(days=1)) == []
