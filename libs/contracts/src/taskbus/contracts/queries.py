"""Request-reply queries answered by event-store on `taskbus.query.<name>`.

Events in replies are the stored JSON as `msgspec.Raw`, so kinds unknown to a reader pass through.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, ClassVar

import msgspec

from taskbus.contracts.events import EventSource
from taskbus.contracts.specs import MAX_NAME_CHARS, MAX_QUERY_TEXT_CHARS, Name, Url
from taskbus.contracts.status import AgentState, ConversationStatus

PageLimit = Annotated[int, msgspec.Meta(ge=1, le=100)]
# Bounds of query parameters (see specs' size limits): a query always fits in a NATS message.
ConversationId = Annotated[str, msgspec.Meta(max_length=64)]
Kinds = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]], msgspec.Meta(max_length=100)
]
QueryText = Annotated[str, msgspec.Meta(max_length=MAX_QUERY_TEXT_CHARS)]
# Time bounds a query may name: ClickHouse's DateTime64 holds 1900..2299; a naive time is UTC.
EARLIEST_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2262, 1, 1, tzinfo=UTC)


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Replies are tagged so a reader decodes `ExpectedReply | QueryError` in one step."""


class Query(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every query is scoped to a user: no reply ever carries another user's rows."""

    subject_name: ClassVar[str]
    user_id: str

    def __post_init__(self) -> None:
        """Every time a query names must be one the store can hold (msgspec reports it as
        invalid, so year 117 is a 422, never an error of the store)."""
        for field in self.__struct_fields__:
            value = getattr(self, field)
            if isinstance(value, datetime):
                aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
                if not EARLIEST_TIME <= aware < LATEST_TIME:
                    raise ValueError(f"{field} must be between 1900 and 2261")


class SearchEvents(Query):
    subject_name = "search_events"
    conversation_id: ConversationId
    start_id: Annotated[int, msgspec.Meta(ge=0)] = 0
    end_id: Annotated[int, msgspec.Meta(ge=0)] | None = None
    reverse: bool = False
    limit: PageLimit = 20
    kinds: Kinds = []
    exclude_kinds: Kinds = []
    source: EventSource | None = None
    since: datetime | None = None
    until: datetime | None = None
    query: QueryText | None = None


class EventPage(Reply):
    events: list[msgspec.Raw]
    has_more: bool
    next_start_id: int | None = None


class GetEvent(Query):
    subject_name = "get_event"
    conversation_id: ConversationId
    event_id: Annotated[int, msgspec.Meta(ge=0)]


class EventReply(Reply):
    event: msgspec.Raw


class ResourceUsageInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation's latest `ResourceUsage` event: its figures, when, and which event."""

    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    pids: int
    disk_bytes: int
    measured_by: str
    measured_at: datetime
    event_id: int


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
    # OpenHands' ConversationInfo fields: the spec's provider, and what started it
    # (taskbus.contracts.openhands.ConversationTrigger).
    git_provider: str | None = None
    trigger: str | None = None
    # What its sandbox used when last measured (kept after the sandbox is gone); None: never.
    resource_usage: ResourceUsageInfo | None = None
    # The conversations it waits for (its spec's `depends_on`), so a graph can be walked.
    depends_on: list[str] = []


class GetConversation(Query):
    subject_name = "get_conversation"
    conversation_id: ConversationId


class ConversationReply(Reply):
    conversation: ConversationInfo


class ListConversations(Query):
    subject_name = "list_conversations"
    page_id: QueryText | None = None
    limit: PageLimit = 20
    status: ConversationStatus | None = None
    repository: Url | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    title_contains: Name | None = None
    # e.g. [ARCHIVED] to hide deleted conversations
    exclude_statuses: list[ConversationStatus] = []


class ConversationPage(Reply):
    conversations: list[ConversationInfo]
    next_page_id: str | None = None


# --- analytics -----------------------------------------------------------------------------------
# Each is answered by one SQL query over the user's own rows. Time windows are `since` inclusive,
# `until` exclusive, on the event's timestamp (for durations: the conversation's creation time).


class CostGroupBy(enum.StrEnum):
    USER = "user"
    DAY = "day"  # UTC day, "YYYY-MM-DD"
    MODEL = "model"
    CONVERSATION = "conversation"


class CostAnalytics(Query):
    """LLM spend summed over `LLMMetrics` events, one bucket per `group_by` key."""

    subject_name = "analytics_cost"
    group_by: CostGroupBy = CostGroupBy.DAY
    since: datetime | None = None
    until: datetime | None = None


class CostBucket(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    cost: float
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    conversations: int


class CostReport(Reply):
    """Buckets sorted by key."""

    group_by: CostGroupBy
    buckets: list[CostBucket]


class DurationAnalytics(Query):
    """How conversations ended and how long they took, for those created in the window."""

    subject_name = "analytics_durations"
    since: datetime | None = None
    until: datetime | None = None


class OutcomeStats(msgspec.Struct, frozen=True, kw_only=True):
    """`status` is the conversation's last status other than ARCHIVED (deleting is not an
    outcome). Durations run from ConversationCreated to that status change and are given only
    for the ended statuses FINISHED, ERROR and STOPPED; quantiles interpolate linearly
    (`statistics.quantiles(method="inclusive")`)."""

    status: ConversationStatus
    conversations: int
    mean_seconds: float | None = None
    p50_seconds: float | None = None
    p90_seconds: float | None = None
    max_seconds: float | None = None


class DurationReport(Reply):
    """One row per status, sorted by status name."""

    outcomes: list[OutcomeStats]


class EventKindCounts(Query):
    subject_name = "analytics_event_kinds"
    conversation_id: ConversationId | None = None
    since: datetime | None = None
    until: datetime | None = None


class KindCount(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    events: int
    conversations: int


class EventKindReport(Reply):
    """Most frequent kind first, ties by kind name."""

    kinds: list[KindCount]


class FailingCommands(Query):
    """Commands whose observation reported a non-zero exit code (a soft timeout, where the
    command is still running, is not a failure)."""

    subject_name = "analytics_failing_commands"
    limit: PageLimit = 10
    since: datetime | None = None
    until: datetime | None = None


class FailingCommand(msgspec.Struct, frozen=True, kw_only=True):
    command: str
    failures: int
    runs: int  # observations of this command with an exit code, failed or not
    conversations: int  # conversations in which it failed
    last_failed_at: datetime
    last_exit_code: int


class FailingCommandsReport(Reply):
    """Most failures first, ties by command text."""

    commands: list[FailingCommand]


class ResourceAnalytics(Query):
    """What each conversation's sandboxes used, from its `ResourceUsage` events in the window."""

    subject_name = "analytics_resources"
    limit: PageLimit = 20
    since: datetime | None = None
    until: datetime | None = None


class ConversationResources(msgspec.Struct, frozen=True, kw_only=True):
    """`cpu_seconds` adds up its sandboxes' CPU time: each sample's figure counts from the
    sandbox's start, and a figure lower than the one before marks a new sandbox. The others
    are the highest any sample in the window reported."""

    conversation_id: str
    samples: int
    cpu_seconds: float
    memory_peak_bytes: int
    max_pids: int
    max_disk_bytes: int
    last_measured_at: datetime


class ResourceReport(Reply):
    """Highest peak memory first, ties by conversation id."""

    conversations: list[ConversationResources]


class QueryError(Reply):
    """Typed error reply: `status` is the HTTP status the gateway should answer with, `kind`
    the problem type it names (e.g. "reply-too-large")."""

    status: int
    title: str
    detail: str = ""
    kind: str = "query-error"
    # Set when retrying later may succeed (e.g. 503 while the event store catches up).
    retry_after_seconds: int | None = None
