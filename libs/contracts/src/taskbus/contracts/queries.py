"""Request-reply queries answered by event-store on `taskbus.query.<name>`.

Events in replies are the stored JSON as `msgspec.Raw`, so kinds unknown to a reader pass through.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar

import msgspec
from taskbus.contracts.events import EventSource
from taskbus.contracts.status import AgentState, ConversationStatus

PageLimit = Annotated[int, msgspec.Meta(ge=1, le=100)]


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Replies are tagged so a reader decodes `ExpectedReply | QueryError` in one step."""


class Query(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every query is scoped to a user: no reply ever carries another user's rows."""

    subject_name: ClassVar[str]
    user_id: str


class SearchEvents(Query):
    subject_name = "search_events"
    conversation_id: str
    start_id: Annotated[int, msgspec.Meta(ge=0)] = 0
    end_id: Annotated[int, msgspec.Meta(ge=0)] | None = None
    reverse: bool = False
    limit: PageLimit = 20
    kinds: list[str] = []
    exclude_kinds: list[str] = []
    source: EventSource | None = None
    since: datetime | None = None
    until: datetime | None = None
    query: str | None = None


class EventPage(Reply):
    events: list[msgspec.Raw]
    has_more: bool
    next_start_id: int | None = None


class GetEvent(Query):
    subject_name = "get_event"
    conversation_id: str
    event_id: Annotated[int, msgspec.Meta(ge=0)]


class EventReply(Reply):
    event: msgspec.Raw


class ConversationInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The projected state of one conversation (ClickHouse `conversations`, KV status)."""

    conversation_id: str
    user_id: str
    title: str
    status: ConversationStatus
    agent_state: AgentState | None = None
    status_reason: str = ""
    repository: str | None = None
    selected_branch: str | None = None
    priority: int = 0
    created_at: datetime
    updated_at: datetime
    accumulated_cost: float = 0.0
    event_count: int = 0
    last_event_id: int = -1


class GetConversation(Query):
    subject_name = "get_conversation"
    conversation_id: str


class ConversationReply(Reply):
    conversation: ConversationInfo


class ListConversations(Query):
    subject_name = "list_conversations"
    page_id: str | None = None
    limit: PageLimit = 20
    status: ConversationStatus | None = None
    repository: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    title_contains: str | None = None


class ConversationPage(Reply):
    conversations: list[ConversationInfo]
    next_page_id: str | None = None


class QueryError(Reply):
    """Typed error reply: `status` is the HTTP status the gateway should answer with."""

    status: int
    title: str
    detail: str = ""
