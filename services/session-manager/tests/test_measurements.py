"""`ResourceUsage` arrives every few seconds while a sandbox runs, and is no activity: it resets
no time limit, never reaches the LLM, makes no step look stuck-free, and wakes no driver."""

from __future__ import annotations

import uuid

from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    AgentFinishAction,
    Event,
    EventSource,
    ResourceUsage,
)
from taskbus.contracts.status import RuntimeStatus
from taskbus.session_manager.conversations import Conversations
from taskbus.session_manager.decide import next_step
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.state import ConversationState
from taskbus.session_manager.stuck import is_stuck
from taskbus.session_manager.time_limits import time_limit_events

from .conftest import FoldEvents
from .test_recovery import created, message, runtime
from .test_state import A, S, agent, metrics, run, status
from .test_time_limits import at, limited, question, runtime_control, timed


def usage(cid: str = "c1") -> ResourceUsage:
    return ResourceUsage(
        conversation_id=cid,
        source=EventSource.ENVIRONMENT,
        cpu_seconds=1.0,
        memory_bytes=1 << 20,
        memory_peak_bytes=1 << 28,
        pids=3,
        measured_by="cgroup",
    )


def every_five_seconds(start: float, end: float) -> list[Event]:
    samples: list[Event] = []
    for second in range(int(start), int(end), 5):
        samples += timed([usage()], second)
    return samples


def test_usage_does_not_keep_an_idle_conversation_awake(fold_events: FoldEvents) -> None:
    waiting = [*limited(idle=300), *timed(question(), 10)]
    measured = [*waiting, *every_five_seconds(11, 400)]
    assert fold_events(*measured).last_activity == fold_events(*waiting).last_activity
    paused = time_limit_events(fold_events(*measured), at(310))
    assert runtime_control(paused) == runtime_control(
        time_limit_events(fold_events(*waiting), at(310))
    )
    assert paused  # the idle pause happens on time, samples or not


def test_usage_does_not_keep_a_finished_conversations_sandbox(fold_events: FoldEvents) -> None:
    finish = AgentFinishAction(conversation_id="c1", source=EventSource.AGENT, final_thought="ok")
    done = [*limited(idle=300), *timed([metrics(), finish, agent(A.FINISHED), status(S.FINISHED)])]
    measured = fold_events(*done, *every_five_seconds(1, 400))
    assert [e.kind for e in time_limit_events(measured, at(300))] == ["RuntimeControlRequested"]


def test_usage_is_not_in_the_llms_history_nor_changes_a_decision(fold_events: FoldEvents) -> None:
    steps: list[Event] = [*limited(idle=300), *timed([metrics(), run("make")], 1)]
    plain, measured = fold_events(*steps), fold_events(*steps, *every_five_seconds(2, 60))
    assert measured.history == plain.history
    assert to_messages(measured) == to_messages(plain)
    assert next_step(measured) == next_step(plain)
    assert is_stuck(measured, 2) == is_stuck(plain, 2)


async def test_usage_wakes_no_driver(bus: JetStreamContext) -> None:
    cid = f"usage-{uuid.uuid4().hex[:8]}"
    changes: list[ConversationState] = []
    conversations = Conversations(bus, changes.append)
    appender = EventAppender(bus)
    await conversations.include(await appender.append_all([created(cid)]))
    ready = await appender.append_all([runtime(cid, RuntimeStatus.READY)])
    await conversations.observe(ready[0])
    reported = len(changes)

    sampled = await appender.append_all([usage(cid), usage(cid)])
    for event in sampled:
        await conversations.observe(event)

    assert conversations[cid].last_event_id == sampled[-1].id  # in log order, no gap
    assert len(changes) == reported  # nothing new to decide on
    spoken = await appender.append_all([message(cid)])
    await conversations.observe(spoken[0])
    assert len(changes) == reported + 1
