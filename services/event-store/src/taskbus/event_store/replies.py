"""Pure construction of query replies from selected rows, and the opaque list cursor.

Pagination of SearchEvents: the SQL asks for `limit + 1` rows; the extra row only says there is
more. `next_start_id` is the value to pass to continue in the same direction:
- forward (`reverse=False`): the next `start_id`, i.e. the last returned id + 1;
- reverse (`reverse=True`): the next `end_id` (inclusive), i.e. the last returned id - 1,
  keeping the same `start_id` as the lower bound.
Either way consecutive pages neither skip nor repeat an event, whatever the filters.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import datetime

import msgspec
from taskbus.contracts.queries import (
    ConversationInfo,
    ConversationPage,
    EventPage,
    ListConversations,
    QueryError,
    SearchEvents,
)


def event_page(query: SearchEvents, rows: Sequence[tuple[int, bytes]]) -> EventPage:
    """`rows` are (id, stored JSON) in page order, at most `query.limit + 1` of them."""
    page = rows[: query.limit]
    has_more = len(rows) > query.limit
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
    query: ListConversations, conversations: Sequence[ConversationInfo]
) -> ConversationPage:
    """`conversations` are newest first, at most `query.limit + 1` of them."""
    page = list(conversations[: query.limit])
    next_page_id = encode_cursor(page[-1]) if len(conversations) > query.limit else None
    return ConversationPage(conversations=page, next_page_id=next_page_id)


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


def internal_error() -> QueryError:
    return QueryError(status=500, title="Event store error", detail="the query failed")
