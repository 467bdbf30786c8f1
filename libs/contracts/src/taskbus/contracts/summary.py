"""The one fold that builds a conversation's summary (`ConversationInfo`) from its events.

Every field of the summary is set by the latest event of the kind that shapes it (`SHAPING`:
status, agent state, cost, title, deletion, resource usage), and the counters follow from the
dense ids. So folding every event (event-store's projection) and folding only the creation, the
latest event of each shaping kind and the log's last event (the gateway, which reads those with
direct gets while the projection lags) give the same summary; `test_summary.py` checks it.
(Deletion is final through `ConversationDeleted`: session-manager appends it before the status
ARCHIVED, and a later status, e.g. from the sandbox's teardown, changes nothing.)

Cost is therefore `LLMMetrics.accumulated_cost`, the producer's running total (the sum of each
call's cost in log order, the figure session-manager checks budgets against), not a sum the
reader keeps: a reader that sees only the latest metrics could not keep one.

`summarize` is idempotent per event: an event whose id is not past `last_event_id` changes
nothing, so a redelivered event is never applied twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from taskbus.contracts.events import (
    AgentStateChanged,
    ConversationCreated,
    ConversationDeleted,
    ConversationRenamed,
    ConversationStatusChanged,
    Event,
    LLMMetrics,
    ResourceUsage,
    UnknownEvent,
)
from taskbus.contracts.openhands import conversation_trigger
from taskbus.contracts.queries import ConversationInfo, ResourceUsageInfo
from taskbus.contracts.status import ConversationStatus

# A created conversation waits for admission until session-manager says otherwise.
INITIAL_STATUS = ConversationStatus.QUEUED
# The kinds whose latest event shapes the summary (besides ConversationCreated).
SHAPING: tuple[type[Event], ...] = (
    ConversationStatusChanged,
    AgentStateChanged,
    LLMMetrics,
    ConversationRenamed,
    ConversationDeleted,
    ResourceUsage,
)


class _Timestamp(msgspec.Struct):
    timestamp: datetime | None = None


_timestamp_decoder = msgspec.json.Decoder(_Timestamp)


def summarize(
    info: ConversationInfo | None, event: Event | UnknownEvent
) -> ConversationInfo | None:
    """Fold one event into a conversation's summary; None means "no conversation (yet)".

    Returns `info` itself (the same object) when the event changes nothing.
    """
    if info is None:
        return _created(event) if isinstance(event, ConversationCreated) else None
    if event.id <= info.last_event_id:
        return info
    info = _at(info, event.id, _timestamp_of(event))
    match event:
        case ConversationDeleted(reason=reason):
            return msgspec.structs.replace(
                info, status=ConversationStatus.ARCHIVED, status_reason=reason
            )
        case ConversationStatusChanged() if info.status is ConversationStatus.ARCHIVED:
            # Deleted is final (ARCHIVED has no successor): a late status, e.g. from tearing
            # the sandbox down, does not bring the conversation back.
            return info
        case ConversationStatusChanged(status=status, reason=reason):
            return msgspec.structs.replace(info, status=status, status_reason=reason)
        case AgentStateChanged(agent_state=agent_state):
            return msgspec.structs.replace(info, agent_state=agent_state)
        case LLMMetrics(accumulated_cost=total):
            return msgspec.structs.replace(info, accumulated_cost=total)
        case ConversationRenamed(title=title):
            return msgspec.structs.replace(info, title=title)
        case ResourceUsage():
            return msgspec.structs.replace(info, resource_usage=_usage(event))
        case _:
            return info


def summary_of_latest(
    created: ConversationCreated,
    latest: Iterable[Event | None],
    last_id: int,
    last_timestamp: datetime,
) -> ConversationInfo:
    """The summary from the creation, the latest event of each `SHAPING` kind (None where the
    log has none) and the id and time of the log's last event: the same as folding them all."""
    info = _created(created)
    for event in sorted((e for e in latest if e is not None), key=lambda e: e.id):
        info = summarize(info, event) or info
    if last_id <= info.last_event_id:
        return info
    return _at(info, last_id, last_timestamp)


def _at(info: ConversationInfo, event_id: int, timestamp: datetime | None) -> ConversationInfo:
    """`info` as of event `event_id`: ids are dense from 0, so it is the (id + 1)th event."""
    return msgspec.structs.replace(
        info,
        event_count=event_id + 1,
        last_event_id=event_id,
        updated_at=max(info.updated_at, timestamp or info.updated_at),
    )


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
        git_provider=spec.git_provider,
        trigger=conversation_trigger(spec),
        depends_on=list(spec.depends_on),
        created_at=event.timestamp,
        updated_at=event.timestamp,
        event_count=event.id + 1,
        last_event_id=event.id,
    )


def _usage(event: ResourceUsage) -> ResourceUsageInfo:
    return ResourceUsageInfo(
        cpu_seconds=event.cpu_seconds,
        memory_bytes=event.memory_bytes,
        memory_peak_bytes=event.memory_peak_bytes,
        pids=event.pids,
        disk_bytes=event.disk_bytes,
        measured_by=event.measured_by,
        measured_at=event.timestamp,
        event_id=event.id,
    )


def _timestamp_of(event: Event | UnknownEvent) -> datetime | None:
    if isinstance(event, UnknownEvent):
        return _timestamp_decoder.decode(event.payload).timestamp
    return event.timestamp
