"""Pure mapping between events / conversation states and ClickHouse rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from taskbus.contracts.events import (
    AnyEvent,
    CmdOutputObservation,
    CmdRunAction,
    CommandTimeout,
    LLMMetrics,
    UnknownEvent,
)
from taskbus.contracts.queries import ConversationInfo, ResourceUsageInfo
from taskbus.contracts.status import AgentState, ConversationStatus

# Envelope keys are columns of their own; every other string value of an event is searchable text.
_ENVELOPE_KEYS = frozenset({"kind", "conversation_id", "id", "source", "timestamp", "cause"})


class StoredEnvelope(msgspec.Struct, kw_only=True):
    """The envelope of any stored event, known kind or not, read leniently."""

    kind: str
    conversation_id: str
    id: int
    source: str = ""
    timestamp: datetime | None = None
    cause: int | None = None


class EventRow(NamedTuple):
    """One row of `events`; field order is the column order of the insert."""

    conversation_id: str
    id: int
    kind: str
    source: str
    cause: int | None
    timestamp: datetime
    user_id: str
    payload: bytes
    text: str
    cost: float
    model: str
    prompt_tokens: int
    completion_tokens: int
    command: str
    exit_code: int | None
    ingested_at: datetime


EVENT_COLUMNS: tuple[str, ...] = EventRow._fields


def event_row(
    stored: bytes,
    event: AnyEvent | UnknownEvent,
    user_id: str,
    received_at: datetime,
    ingested_at: datetime,
) -> EventRow:
    """`stored` is the exact JSON of `event` as logged; `received_at` stands in for a missing
    timestamp (only possible for kinds this version does not know)."""
    data: dict[str, Any] = msgspec.json.decode(stored)
    envelope = msgspec.convert(data, StoredEnvelope)
    row = EventRow(
        conversation_id=envelope.conversation_id,
        id=envelope.id,
        kind=envelope.kind,
        source=envelope.source,
        cause=envelope.cause,
        timestamp=envelope.timestamp or received_at,
        user_id=user_id,
        payload=stored,
        text=searchable_text(data),
        cost=0.0,
        model="",
        prompt_tokens=0,
        completion_tokens=0,
        command="",
        exit_code=None,
        ingested_at=ingested_at,
    )
    match event:
        case LLMMetrics():
            return row._replace(
                cost=event.cost,
                model=event.model,
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
            )
        case CmdRunAction():
            return row._replace(command=event.command)
        case CmdOutputObservation():
            # After a soft timeout the command is still running: it has no exit code yet.
            exit_code = None if event.timed_out is CommandTimeout.SOFT else event.exit_code
            return row._replace(command=event.command, exit_code=exit_code)
        case _:
            return row


def searchable_text(data: dict[str, Any]) -> str:
    """Every string value of the event outside the envelope, one per line.

    Searching these values rather than the raw JSON means a query matches what a reader sees:
    quotes, newlines and backslashes are not JSON-escaped, and field names never match.
    """
    payload = [value for key, value in data.items() if key not in _ENVELOPE_KEYS]
    return "\n".join(_strings(payload))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


class ConversationRow(NamedTuple):
    """One row of `conversations`; field order is the column order of inserts and selects."""

    conversation_id: str
    user_id: str
    title: str
    status: str
    agent_state: str | None
    status_reason: str
    repository: str | None
    selected_branch: str | None
    priority: int
    created_at: datetime
    updated_at: datetime
    accumulated_cost: float
    event_count: int
    last_event_id: int
    git_provider: str | None
    trigger: str | None
    depends_on: list[str]
    resource_usage: str | None  # the JSON of `ConversationInfo.resource_usage`


CONVERSATION_COLUMNS: tuple[str, ...] = ConversationRow._fields


def conversation_row(info: ConversationInfo) -> ConversationRow:
    return ConversationRow(
        conversation_id=info.conversation_id,
        user_id=info.user_id,
        title=info.title,
        status=info.status.value,
        agent_state=info.agent_state.value if info.agent_state is not None else None,
        status_reason=info.status_reason,
        repository=info.repository,
        selected_branch=info.selected_branch,
        priority=info.priority,
        created_at=info.created_at,
        updated_at=info.updated_at,
        accumulated_cost=info.accumulated_cost,
        event_count=info.event_count,
        last_event_id=info.last_event_id,
        git_provider=info.git_provider,
        trigger=info.trigger,
        depends_on=info.depends_on,
        resource_usage=None
        if info.resource_usage is None
        else msgspec.json.encode(info.resource_usage).decode(),
    )


def conversation_from_row(values: Sequence[Any]) -> ConversationInfo:
    row = ConversationRow(*values)
    return ConversationInfo(
        conversation_id=row.conversation_id,
        user_id=row.user_id,
        title=row.title,
        status=ConversationStatus(row.status),
        agent_state=AgentState(row.agent_state) if row.agent_state is not None else None,
        status_reason=row.status_reason,
        repository=row.repository,
        selected_branch=row.selected_branch,
        priority=row.priority,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        accumulated_cost=row.accumulated_cost,
        event_count=row.event_count,
        last_event_id=row.last_event_id,
        git_provider=row.git_provider,
        trigger=row.trigger,
        depends_on=list(row.depends_on),
        resource_usage=None
        if row.resource_usage is None
        else msgspec.json.decode(row.resource_usage, type=ResourceUsageInfo),
    )


def as_utc(value: datetime) -> datetime:
    """Drivers may hand back naive datetimes for UTC columns; make them explicit."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
