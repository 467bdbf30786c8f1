"""Conversation time limits (`idle_seconds`, `max_duration_seconds`) decided from the fold and
a clock: what each limit appends, and how an idle conversation wakes up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from taskbus.contracts.events import (
    ActionProposed,
    AgentFinishAction,
    ErrorObservation,
    Event,
    EventSource,
    MessageAction,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeStatusChanged,
)
from taskbus.contracts.specs import Timeouts
from taskbus.contracts.status import RuntimeStatus
from taskbus.session_manager.decide import Step, is_settled, next_step
from taskbus.session_manager.lifecycle import confirmation_events
from taskbus.session_manager.time_limits import time_limit_events

from .conftest import FoldEvents
from .test_state import A, S, agent, kinds_and_states, metrics, play, run, started, status, user

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def timed(events: list[Event], seconds: float = 0) -> list[Event]:
    """`events` as if all were appended `seconds` after T0."""
    when = T0 + timedelta(seconds=seconds)
    return [msgspec.structs.replace(e, timestamp=when) for e in events]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def limited(idle: float | None = None, duration: float | None = None) -> list[Event]:
    timeouts = Timeouts(idle_seconds=idle, max_duration_seconds=duration)
    return timed(started(timeouts=timeouts))


def question() -> list[Event]:
    asked = MessageAction(conversation_id="c1", source=EventSource.AGENT, content="Which one?")
    return [metrics(), asked, agent(A.AWAITING_USER_INPUT)]


def runtime_is(status: RuntimeStatus) -> RuntimeStatusChanged:
    return RuntimeStatusChanged(conversation_id="c1", source=EventSource.ENVIRONMENT, status=status)


def runtime_control(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.action, e.reason) for e in events if isinstance(e, RuntimeControlRequested)]


def test_max_duration_stops_the_conversation_with_reason_timeout(fold_events: FoldEvents) -> None:
    busy = fold_events(*limited(duration=60), *timed([metrics(), run("make")], 59))
    assert time_limit_events(busy, at(59.9)) == []
    stopped = time_limit_events(busy, at(60))
    assert kinds_and_states(stopped) == [
        ("ConversationStatusChanged", "STOPPED"),
        ("AgentStateChanged", "stopped"),
        ("RuntimeControlRequested", ""),
    ]
    assert {getattr(e, "reason", None) for e in stopped} == {"timeout"}
    assert runtime_control(stopped) == [(RuntimeControl.STOP, "timeout")]
    after = fold_events(*limited(duration=60), *timed([metrics(), run("make"), *stopped], 60))
    assert time_limit_events(after, at(1000)) == []  # applied once


def test_max_duration_counts_from_the_latest_start(fold_events: FoldEvents) -> None:
    first_run = [*limited(duration=60), *timed([status(S.STOPPED), user("again")], 30)]
    restarted = timed([status(S.STARTING)], 100)
    state = fold_events(*first_run, *restarted)
    assert time_limit_events(state, at(159)) == []
    assert kinds_and_states(time_limit_events(state, at(160)))[0] == (
        "ConversationStatusChanged",
        "STOPPED",
    )


def test_idle_pauses_a_conversation_that_waits_for_its_user(fold_events: FoldEvents) -> None:
    state = fold_events(*limited(idle=300), *timed(question(), 10))
    assert time_limit_events(state, at(309)) == []
    paused = time_limit_events(state, at(310))
    assert kinds_and_states(paused) == [
        ("RuntimeControlRequested", ""),
        ("ConversationStatusChanged", "PAUSED"),
        ("AgentStateChanged", "paused"),
    ]
    assert runtime_control(paused) == [(RuntimeControl.PAUSE, "idle")]
    sandbox_paused = runtime_is(RuntimeStatus.PAUSED)
    idle = [*limited(idle=300), *timed(question(), 10), *timed([*paused, sandbox_paused], 310)]
    assert fold_events(*idle).status_reason == "idle"
    assert next_step(fold_events(*idle)) is Step.WAIT
    assert time_limit_events(fold_events(*idle), at(5000)) == []

    # The user's next message wakes it: the sandbox resumes and the agent takes the message.
    woken = next_step(fold_events(*idle, user("The second one.")))
    assert kinds_and_states(woken) == [
        ("RuntimeControlRequested", ""),
        ("ConversationStatusChanged", "RUNNING"),
        ("AgentStateChanged", "running"),
    ]
    assert runtime_control(woken) == [(RuntimeControl.RESUME, "user_returned")]  # type: ignore[arg-type]
    resumed = [*idle, user("The second one."), *woken]  # type: ignore[misc]
    assert next_step(fold_events(*resumed)) is Step.WAIT  # until the sandbox runs again
    assert next_step(fold_events(*resumed, runtime_is(RuntimeStatus.READY))) is Step.CALL_LLM
    # A runner that cannot resume it answers with an error: the agent goes on and hears of it.
    resume_id = len(idle) + 1
    failed = ErrorObservation(
        conversation_id="c1",
        source=EventSource.ENVIRONMENT,
        cause=resume_id,
        content="No sandbox is running for this conversation.",
        code="no_runtime",
    )
    assert isinstance(resumed[resume_id], RuntimeControlRequested)
    assert next_step(fold_events(*resumed, failed)) is Step.CALL_LLM


def test_a_user_pause_is_not_lifted_by_a_message(fold_events: FoldEvents) -> None:
    paused = [*limited(idle=300), status(S.PAUSED, "user_pause"), agent(A.PAUSED)]
    assert next_step(fold_events(*paused, user("hello?"))) is Step.WAIT


def test_idle_never_interrupts_work(fold_events: FoldEvents) -> None:
    command_running = fold_events(*limited(idle=300), *timed([metrics(), run("sleep 900")], 10))
    assert time_limit_events(command_running, at(5000)) == []
    about_to_call_the_llm = fold_events(*limited(idle=300))
    assert time_limit_events(about_to_call_the_llm, at(5000)) == []


def test_an_idle_wait_for_confirmation_is_woken_by_the_answer(fold_events: FoldEvents) -> None:
    proposal = ActionProposed(conversation_id="c1", source=EventSource.AGENT, proposed=run("rm x"))
    prefix = [
        *timed(started(confirmation_mode=True, timeouts=Timeouts(idle_seconds=60))),
        *timed([metrics(), proposal], 1),
    ]
    prefix += timed(next_step(fold_events(*prefix)), 2)  # type: ignore[arg-type]
    prefix += timed(time_limit_events(fold_events(*prefix), at(62)), 62)
    assert fold_events(*prefix).status == S.PAUSED
    (answer,) = confirmation_events(fold_events(*prefix), confirmed=True)
    played = play(fold_events, [*prefix, answer])
    assert [e.kind for e in played[len(prefix) + 1 :]][:5] == [
        "RuntimeControlRequested",
        "ConversationStatusChanged",
        "AgentStateChanged",
        "RuntimeStatusChanged",  # the runner unpaused the sandbox: only now the action
        "CmdRunAction",
    ]


def test_an_idle_finished_conversation_gives_its_sandbox_back(fold_events: FoldEvents) -> None:
    finish = AgentFinishAction(conversation_id="c1", source=EventSource.AGENT, final_thought="ok")
    done = [*limited(idle=300), *timed([metrics(), finish, agent(A.FINISHED), status(S.FINISHED)])]
    assert time_limit_events(fold_events(*done), at(299)) == []
    released = time_limit_events(fold_events(*done), at(300))
    assert runtime_control(released) == [(RuntimeControl.STOP, "idle")]
    assert fold_events(*done, *released).status == S.FINISHED  # the outcome stays
    gone = [*done, *timed([*released, runtime_is(RuntimeStatus.STOPPED)], 300)]
    assert time_limit_events(fold_events(*gone), at(5000)) == []
    # Only now may the service forget it: nothing is held and nothing is to do.
    assert not is_settled(fold_events(*done)) and is_settled(fold_events(*gone))
    # A later message needs a sandbox again, on the same workspace.
    assert next_step(fold_events(*gone, user("One more thing."))) is Step.READMIT
    assert not is_settled(fold_events(*gone, user("One more thing.")))


def test_the_operators_release_gives_back_finished_and_failed_sandboxes_sooner(
    fold_events: FoldEvents,
) -> None:
    """`sandbox_release_seconds` bounds how long an ended conversation holds its sandbox, even
    with no idle limit; it never ends a running one, nor changes an ended one's status."""
    finish = AgentFinishAction(conversation_id="c1", source=EventSource.AGENT, final_thought="ok")
    ends = {
        S.FINISHED: [metrics(), finish, agent(A.FINISHED), status(S.FINISHED)],
        S.ERROR: [metrics(), agent(A.ERROR, "llm_error"), status(S.ERROR, "llm_error")],
    }
    for idle in (None, 1800.0):
        for ended, events in ends.items():
            done = fold_events(*limited(idle=idle), *timed(events))
            assert time_limit_events(done, at(59.9), release_seconds=60) == []
            released = time_limit_events(done, at(60), release_seconds=60)
            assert runtime_control(released) == [(RuntimeControl.STOP, "idle")]
            assert fold_events(*limited(idle=idle), *timed(events), *released).status == ended
    # A shorter idle limit of the conversation's own comes first.
    finished = fold_events(*limited(idle=30), *timed(ends[S.FINISHED]))
    assert runtime_control(time_limit_events(finished, at(30), release_seconds=60))
    # A conversation waiting for its user is no ended one: it keeps its sandbox.
    waiting = fold_events(*limited(), *timed(question()))
    assert time_limit_events(waiting, at(5000), release_seconds=60) == []
