"""A long conversation log as a working agent writes one, for tests and benches of costs that
must not grow with the history (the fold, reloads)."""

from __future__ import annotations

import msgspec

from taskbus.contracts.events import (
    CmdOutputObservation,
    CmdRunAction,
    CondensationAction,
    ConversationCreated,
    ConversationStatusChanged,
    Event,
    EventSource,
    LLMMetrics,
    MessageAction,
    ResourceUsage,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus


def agent_events(cid: str, count: int, condense_every: int = 300) -> list[Event]:
    """`count` events, ids as the appender gives them (0, 1, …): the creation and the task,
    then commands and their output, metrics, measurements, and a condensation every
    `condense_every` events (as a real model's context forces)."""
    env, agent = EventSource.ENVIRONMENT, EventSource.AGENT
    events: list[Event] = [
        ConversationCreated(
            conversation_id=cid, source=EventSource.USER, user_id="u", title="t",
            spec=ConversationSpec(),
        ),
        ConversationStatusChanged(
            conversation_id=cid, source=env, status=ConversationStatus.RUNNING
        ),
        MessageAction(conversation_id=cid, source=EventSource.USER, content="the task"),
    ]  # fmt: skip
    while len(events) < count:
        i = len(events)
        if i % condense_every == 0:
            events.append(
                CondensationAction(
                    conversation_id=cid, source=agent, forgotten_start_id=3,
                    forgotten_end_id=i - 40, summary=f"what happened up to {i - 40}",
                )
            )  # fmt: skip
        elif i % 4 == 1:
            events.append(CmdRunAction(conversation_id=cid, source=agent, command=f"make {i}"))
        elif i % 4 == 2:
            events.append(
                CmdOutputObservation(
                    conversation_id=cid, source=env, cause=i - 1, command="make",
                    content=f"built target {i}\n" * 4, exit_code=0,
                )
            )  # fmt: skip
        elif i % 4 == 3:
            events.append(LLMMetrics(conversation_id=cid, source=agent, model="m", cost=0.001))
        else:
            events.append(ResourceUsage(conversation_id=cid, source=env, pids=i % 50))
    return [msgspec.structs.replace(e, id=i) for i, e in enumerate(events[:count])]
