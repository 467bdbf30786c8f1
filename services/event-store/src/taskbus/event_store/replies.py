"""Pure construction of query replies from selected rows, and the opaque list cursor.

Pagination of SearchEvents: the SQL asks for `limit + 1` rows; the extra row only says there is
more. `next_start_id` is the value to pass to continue in the same direction:
- forward (`reverse=False`): the next `start_id`, i.e. the last returned id + 1;
- reverse (`reverse=True`): the next `end_id` (inclusive), i.e. the last returned id - 1,
  keeping the same `start_id` as the lower bound.
Either way consecutive pages neither skip nor repeat an event, whatever the filters.

Every reply must fit in one NATS message (`max_bytes`, the connection's max_payload): a page
whose rows would not fit is cut to the rows that do, with `has_more` and the cursor set so the
next page continues after them; any other reply that would not fit becomes a `reply-too-large`
QueryError. A client is never left waiting for an answer that cannot be sent.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from taskbus.contracts.queries import (
    ConversationInfo,
    ConversationPage,
    ConversationResources,
    CostAnalytics,
    CostBucket,
    CostReport,
    DurationReport,
    EventKindReport,
    EventPage,
    FailingCommand,
    FailingCommandsReport,
    KindCount,
    ListConversations,
    OutcomeStats,
    QueryError,
    Reply,
    ResourceReport,
    SearchEvents,
)
from taskbus.contracts.specs import NATS_DEFAULT_MAX_PAYLOAD
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store.rows import as_utc

Rows = Sequence[Sequence[Any]]

# Room for a page's envelope (type tag, has_more, cursor) beside its rows.
_ENVELOPE_BYTES = 1024
_encoder = msgspec.json.Encoder()


def rows_that_fit(sizes: Sequence[int], max_bytes: int) -> int:
    """How many leading rows of these encoded sizes fit in one reply of `max_bytes`."""
    total = _ENVELOPE_BYTES
    for count, size in enumerate(sizes):
        total += size + 1  # and the comma
        if total > max_bytes:
            return count
    return len(sizes)


def encode_reply(reply: Reply, max_bytes: int = NATS_DEFAULT_MAX_PAYLOAD) -> bytes:
    """The reply as sent, or a reply-too-large QueryError when it would exceed `max_bytes`."""
    data = _encoder.encode(reply)
    if len(data) <= max_bytes:
        return data
    return _encoder.encode(
        QueryError(
            status=422,
            kind="reply-too-large",
            title="Reply too large",
            detail=f"the answer is larger than the bus allows ({max_bytes} bytes); ask for less",
        )
    )


def event_page(
    query: SearchEvents,
    rows: Sequence[tuple[int, bytes]],
    max_bytes: int = NATS_DEFAULT_MAX_PAYLOAD,
) -> EventPage | QueryError:
    """`rows` are (id, stored JSON) in page order, at most `query.limit + 1` of them."""
    page = rows[: query.limit]
    fitting = rows_that_fit([len(payload) for _, payload in page], max_bytes)
    if fitting == 0 and page:
        return event_too_large(query.conversation_id, page[0][0])
    page = page[:fitting]
    has_more = len(rows) > len(page)
    next_start_id = None
    if has_more:
        last_id = page[-1][0]
        next_start_id = last_id - 1 if query.reverse else last_id + 1
    return EventPage(
        events=[msgspec.Raw(payload) for _, payload in page],
        has_more=has_more,
        next_start_id=next_start_id,
    )


def conversation_page(
    query: ListConversations,
    conversations: Sequence[ConversationInfo],
    max_bytes: int = NATS_DEFAULT_MAX_PAYLOAD,
) -> ConversationPage:
    """`conversations` are newest first, at most `query.limit + 1` of them."""
    page = list(conversations[: query.limit])
    # One conversation is a few KB at most (its strings are bounded), so at least one fits.
    sizes = [len(_encoder.encode(info)) for info in page]
    page = page[: max(1, rows_that_fit(sizes, max_bytes))]
    next_page_id = encode_cursor(page[-1]) if len(conversations) > len(page) else None
    return ConversationPage(conversations=page, next_page_id=next_page_id)


def cost_report(query: CostAnalytics, rows: Rows) -> CostReport:
    """`rows` as selected by `sql.cost_analytics`."""
    return CostReport(
        group_by=query.group_by,
        buckets=[
            CostBucket(
                key=key,
                cost=cost,
                llm_calls=calls,
                prompt_tokens=prompt,
                completion_tokens=completion,
                conversations=conversations,
            )
            for key, cost, calls, prompt, completion, conversations in rows
        ],
    )


def duration_report(rows: Rows) -> DurationReport:
    """`rows` as selected by `sql.duration_analytics`."""
    return DurationReport(
        outcomes=[
            OutcomeStats(
                status=ConversationStatus(status),
                conversations=conversations,
                mean_seconds=_seconds(mean),
                p50_seconds=_seconds(p50),
                p90_seconds=_seconds(p90),
                max_seconds=_seconds(longest),
            )
            for status, conversations, mean, p50, p90, longest in rows
        ]
    )


def event_kind_report(rows: Rows) -> EventKindReport:
    """`rows` as selected by `sql.event_kind_counts`."""
    return EventKindReport(
        kinds=[
            KindCount(kind=kind, events=events, conversations=conversations)
            for kind, events, conversations in rows
        ]
    )


def failing_commands_report(rows: Rows) -> FailingCommandsReport:
    """`rows` as selected by `sql.failing_commands`."""
    return FailingCommandsReport(
        commands=[
            FailingCommand(
                command=command,
                failures=failures,
                runs=runs,
                conversations=conversations,
                last_failed_at=as_utc(last_failed_at),
                last_exit_code=last_exit_code,
            )
            for command, failures, runs, conversations, last_failed_at, last_exit_code in rows
        ]
    )


def resource_report(rows: Rows) -> ResourceReport:
    """`rows` as selected by `sql.resource_analytics`."""
    conversations = [
        ConversationResources(
            conversation_id=conversation_id,
            samples=samples,
            cpu_seconds=float(cpu),
            memory_peak_bytes=peak,
            max_pids=pids,
            max_disk_bytes=disk,
            last_measured_at=as_utc(last),
        )
        for conversation_id, samples, cpu, peak, pids, disk, last in rows
    ]
    return ResourceReport(conversations=conversations)


def _seconds(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


class _Cursor(msgspec.Struct, array_like=True):
    created_at: datetime
    conversation_id: str


class InvalidCursor(ValueError):
    pass


def encode_cursor(last: ConversationInfo) -> str:
    """The position after `last` in (created_at desc, conversation_id desc) order."""
    raw = msgspec.json.encode(_Cursor(last.created_at, last.conversation_id))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(page_id: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(page_id + "=" * (-len(page_id) % 4))
        cursor = msgspec.json.decode(raw, type=_Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError) as error:
        raise InvalidCursor(f"invalid page_id: {page_id!r}") from error
    return cursor.created_at, cursor.conversation_id


def invalid_query(detail: str) -> QueryError:
    return QueryError(status=422, title="Invalid query", detail=detail)


def conversation_not_found(conversation_id: str) -> QueryError:
    # Another user's conversation answers exactly like a missing one (404, not 403).
    return QueryError(
        status=404, title="Conversation not found", detail=f"no conversation {conversation_id}"
    )


def event_not_found(conversation_id: str, event_id: int) -> QueryError:
    return QueryError(
        status=404, title="Event not found", detail=f"no event {event_id} in {conversation_id}"
    )


def event_too_large(conversation_id: str, event_id: int) -> QueryError:
    return QueryError(
        status=422,
        kind="reply-too-large",
        title="Event too large",
        detail=f"event {event_id} of {conversation_id} is larger than one reply may be",
    )


def not_caught_up(waited_seconds: float) -> QueryError:
    """The ingest did not reach the log's position within the bound: a clear, retryable 503
    rather than an answer that silently lacks events."""
    return QueryError(
        status=503,
        kind="store-catching-up",
        title="Event store catching up",
        detail=(
            f"the event store has not stored the latest events within {waited_seconds:g} s;"
            " retry shortly"
        ),
        retry_after_seconds=1,
    )


def internal_error() -> QueryError:
    return QueryError(status=500, title="Event store error", detail="the query failed")
