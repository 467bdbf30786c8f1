"""The conversation status projection as a pure fold over the event log.

`apply` is idempotent per event: an event whose id is not past `last_event_id` changes nothing,
so a redelivered event (after a crash between insert and ack) is never counted twice. Ids are
dense and delivered in order per conversation, which is what makes this check sufficient.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from taskbus.contracts.events import (
    AgentStateChanged,
    AnyEvent,
    ConversationCreated,
    ConversationDeleted,
    ConversationStatusChanged,
    LLMMetrics,
    UnknownEvent,
)
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store.rows import stored_envelope

# A created conversation waits for admission until session-manager says otherwise.
INITIAL_STATUS = ConversationStatus.QUEUED


def apply(info: ConversationInfo | None, event: AnyEvent | UnknownEvent) -> ConversationInfo | None:
    """Fold one event into a conversation's state; None means "no conversation (yet)".

    Returns `info` itself (the same object) when the event changes nothing.
    """
    if info is None:
        return _created(event) if isinstance(event, ConversationCreated) else None
    if event.id <= info.last_event_id:
        return info
    info = msgspec.structs.replace(
        info,
        event_count=info.event_count + 1,
        last_event_id=event.id,
        updated_at=max(info.updated_at, _timestamp_of(event) or info.updated_at),
    )
    match event:
        case ConversationDeleted(reason=reason):
            return msgspec.structs.replace(
                info, status=ConversationStatus.ARCHIVED, status_reason=reason
            )
        case ConversationStatusChanged() if info.status is ConversationStatus.ARCHIVED:
            # Deleted is final (ARCHIVED has no successor): a late status, e.g. from tearing
            # the sandbox down, does not bring the conversation back into the lists.
            return info
        case ConversationStatusChanged(status=status, reason=reason):
            return msgspec.structs.replace(info, status=status, status_reason=reason)
        case AgentStateChanged(agent_state=agent_state):
            return msgspec.structs.replace(info, agent_state=agent_state)
        case LLMMetrics(cost=cost):
            # Summing each call's cost (rather than trusting the producer's running total) keeps
            # the projection equal to `sum(cost)` over the stored events.
            return msgspec.structs.replace(info, accumulated_cost=info.accumulated_cost + cost)
        case _:
            return info


def in_log_order(info: ConversationInfo | None, event: AnyEvent | UnknownEvent) -> bool:
    """Whether folding `event` now keeps the conversation's order.

    True for the next event, one already folded (a redelivery) and a conversation's beginning.
    False after a gap: JetStream redelivers an unacked event only after its ack wait, so after a
    crash newer events can arrive before older ones, and folding them first would skip the older
    ones for good.
    """
    if info is None:
        return isinstance(event, ConversationCreated) or event.id <= 0
    return event.id <= info.last_event_id + 1


def is_newer(candidate: ConversationInfo, current: ConversationInfo) -> bool:
    """Whether `candidate` may replace `current` without moving the conversation backwards."""
    return candidate.last_event_id > current.last_event_id


def _created(event: ConversationCreated) -> ConversationInfo:
    spec = event.spec
    return ConversationInfo(
        conversation_id=event.conversation_id,
        user_id=event.user_id,
        title=event.title,
        status=INITIAL_STATUS,
        repository=spec.repository,
        selected_branch=spec.selected_branch,
        priority=spec.priority,
        created_at=event.timestamp,
        updated_at=event.timestamp,
        event_count=1,
        last_event_id=event.id,
    )


def _timestamp_of(event: AnyEvent | UnknownEvent) -> datetime | None:
    if isinstance(event, UnknownEvent):
        return stored_envelope(event.payload).timestamp
    return event.timestamp
