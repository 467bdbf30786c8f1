"""Every SQL statement of the event-store: the schema migrations and the queries.

User input only ever reaches ClickHouse as a bound parameter (`{name:Type}` placeholders filled
by clickhouse-connect's `parameters=`); the SQL text itself is built from fixed fragments.

Why ReplacingMergeTree + FINAL: ingest is at-least-once (a batch is inserted, then acked), so a
redelivered batch inserts the same (user_id, conversation_id, id) rows again. A
ReplacingMergeTree keyed on that sorting key keeps one row per key after background merges, and
`FINAL` makes every read see the merged result before the merge has happened. Reads are always
scoped to one user or one of their conversations, i.e. to a prefix of the sorting key, so FINAL
merges only what they own; a search page narrows that to a window of ids (`search`). The
alternative, `argMax(payload, ingested_at) GROUP BY id` per query, gives the same answer with
more SQL at every call site; insert-time dedup (`insert_deduplicate`) only catches byte-identical
blocks, and a redelivered batch is rarely cut the same way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from taskbus.contracts.events import (
    CmdOutputObservation,
    ConversationCreated,
    ConversationStatusChanged,
    LLMMetrics,
    ResourceUsage,
)
from taskbus.contracts.queries import (
    CostAnalytics,
    CostGroupBy,
    DurationAnalytics,
    EventKindCounts,
    FailingCommands,
    ListConversations,
    ResourceAnalytics,
    SearchEvents,
)
from taskbus.contracts.status import ENDED_STATUSES, ConversationStatus
from taskbus.event_store.rows import CONVERSATION_COLUMNS


class Migration(NamedTuple):
    version: int
    description: str
    statements: tuple[str, ...]


class Statement(NamedTuple):
    sql: str
    parameters: dict[str, Any]


SCHEMA_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32,
    description String,
    applied_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(applied_at) ORDER BY version
"""

APPLIED_MIGRATIONS = "SELECT version FROM schema_migrations FINAL"

# Append-only: a released migration is never edited, a change is a new version. Statements are
# idempotent (IF NOT EXISTS) so a migration interrupted half-way can simply run again.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="events and conversations",
        statements=(
            """
            CREATE TABLE IF NOT EXISTS events (
                conversation_id String,
                id Int64,
                kind LowCardinality(String),
                source LowCardinality(String),
                cause Nullable(Int64),
                timestamp DateTime64(6, 'UTC'),
                user_id String,
                payload String CODEC(ZSTD(3)),
                text String CODEC(ZSTD(3)),
                cost Float64,
                model LowCardinality(String),
                prompt_tokens UInt32,
                completion_tokens UInt32,
                command String,
                exit_code Nullable(Int32),
                ingested_at DateTime64(6, 'UTC')
            ) ENGINE = ReplacingMergeTree(ingested_at)
            ORDER BY (conversation_id, id)
            """,
            # The version is event_count, which grows exactly when last_event_id does: the row
            # that has seen the most of the log wins, so the table never moves backwards.
            """
            CREATE TABLE IF NOT EXISTS conversations (
                conversation_id String,
                user_id String,
                title String,
                status LowCardinality(String),
                agent_state LowCardinality(Nullable(String)),
                status_reason String,
                repository Nullable(String),
                selected_branch Nullable(String),
                priority Int32,
                created_at DateTime64(6, 'UTC'),
                updated_at DateTime64(6, 'UTC'),
                accumulated_cost Float64,
                event_count UInt64,
                last_event_id Int64
            ) ENGINE = ReplacingMergeTree(event_count)
            ORDER BY (user_id, conversation_id)
            """,
        ),
    ),
    # Every query carries the user (isolation), so with the user first in the key a
    # conversation's page and one user's analytics are both index reads: analytics cost what
    # the user owns, not what the table holds. A conversation's user never changes, so rows
    # still collapse exactly as before. Re-runnable: each step works on what the last left.
    Migration(
        version=2,
        description="events ordered by (user_id, conversation_id, id)",
        statements=(
            "CREATE TABLE IF NOT EXISTS events_by_user AS events"
            " ENGINE = ReplacingMergeTree(ingested_at) ORDER BY (user_id, conversation_id, id)",
            "INSERT INTO events_by_user SELECT * FROM events",
            "RENAME TABLE events TO events_before_v2, events_by_user TO events",
            "DROP TABLE IF EXISTS events_before_v2 SYNC",
        ),
    ),
    Migration(
        version=3,
        description="conversations' git_provider and trigger (OpenHands' ConversationInfo)",
        statements=(
            "ALTER TABLE conversations ADD COLUMN IF NOT EXISTS git_provider Nullable(String)",
            "ALTER TABLE conversations ADD COLUMN IF NOT EXISTS trigger Nullable(String)",
        ),
    ),
    Migration(
        version=4,
        description="conversations' depends_on (task dependencies)",
        statements=("ALTER TABLE conversations ADD COLUMN IF NOT EXISTS depends_on Array(String)",),
    ),
    Migration(
        version=5,
        description="conversations' latest resource usage (JSON of ResourceUsageInfo)",
        statements=(
            "ALTER TABLE conversations ADD COLUMN IF NOT EXISTS resource_usage Nullable(String)",
        ),
    ),
    # The ingest looks a conversation up by id alone when it is not in its bounded cache
    # (conversation_cache): without an index on the id, that read the whole table, ~90 ms a
    # batch at 200k conversations; with it ~10 ms. Existing parts are indexed in the background.
    Migration(
        version=6,
        description="a bloom filter index on conversations' id",
        statements=(
            "ALTER TABLE conversations ADD INDEX IF NOT EXISTS conversation_id_bloom"
            " conversation_id TYPE bloom_filter GRANULARITY 1",
            "ALTER TABLE conversations MATERIALIZE INDEX conversation_id_bloom",
        ),
    ),
    # A search page reads the granules its id window touches (event_store.search), and a
    # granule of ClickHouse's default 8,192 rows made a page of a long conversation cost ~1.7x
    # one of a short one (whose whole part is one small granule); with 256 rows, ~1.0x. Analytics
    # read whole users either way. Re-runnable: a copy left by an interrupted run is dropped
    # first, and rows copied twice collapse as any duplicate does.
    Migration(
        version=7,
        description="events in granules of 256 rows",
        statements=(
            "DROP TABLE IF EXISTS events_before_v7 SYNC",
            "CREATE TABLE IF NOT EXISTS events_v7 AS events"
            " ENGINE = ReplacingMergeTree(ingested_at) ORDER BY (user_id, conversation_id, id)"
            " SETTINGS index_granularity = 256",
            "INSERT INTO events_v7 SELECT * FROM events",
            "RENAME TABLE events TO events_before_v7, events_v7 TO events",
            "DROP TABLE IF EXISTS events_before_v7 SYNC",
        ),
    ),
    # Every insert writes a new part, and a part in ClickHouse's default ("full") storage is a
    # directory of about ten files: on these machines' ext4, creating them cost 12-14 ms of CPU
    # an insert, whatever its size, and the ingest inserts a few times a second. A part under
    # 10 MiB is now one packed file (2-3 ms); merges write full parts past that size. The
    # setting is listed among ClickHouse Cloud's, but the open-source engine (chDB 26.9) honours
    # it, and lightweight deletes, mutations and index materialization work on packed parts.
    Migration(
        version=8,
        description="small parts packed in one file",
        statements=tuple(
            f"ALTER TABLE {table} MODIFY SETTING min_bytes_for_full_part_storage = 10485760"
            for table in ("events", "conversations")
        ),
    ),
)


def pending_migrations(applied: set[int]) -> list[Migration]:
    return [migration for migration in MIGRATIONS if migration.version not in applied]


# Every table the migrations create (an interrupted one's included), and their record: a
# rebuild drops them all and migrates from scratch. SYNC frees the name at once (an Atomic
# database otherwise drops it minutes later).
TABLES = (
    "events",
    "conversations",
    "schema_migrations",
    "events_by_user",
    "events_before_v2",
    "events_v7",
    "events_before_v7",
)
DROP_TABLES = tuple(f"DROP TABLE IF EXISTS {table} SYNC" for table in TABLES)


_CONVERSATION_SELECT = f"SELECT {', '.join(CONVERSATION_COLUMNS)} FROM conversations FINAL"

ALL_CONVERSATIONS = Statement(_CONVERSATION_SELECT, {})


# The ingest's cache of conversations (event_store.conversation_cache): a miss, the recent ones
# to start warm, and the deleted ones a stop left unpurged. Without the user, they read the
# whole (one row per conversation) table: on a miss or a start, never per event.
def conversations_by_id(conversation_ids: list[str]) -> Statement:
    """The latest row of each (the most events, as FINAL would keep), by the id's index."""
    return Statement(
        f"SELECT {', '.join(CONVERSATION_COLUMNS)} FROM conversations"
        " WHERE conversation_id IN {ids:Array(String)}"
        " ORDER BY event_count DESC LIMIT 1 BY conversation_id",
        {"ids": conversation_ids},
    )


def recent_conversations(limit: int) -> Statement:
    return Statement(
        f"{_CONVERSATION_SELECT} ORDER BY updated_at DESC LIMIT {{limit:UInt64}}",
        {"limit": limit},
    )


DELETED_CONVERSATIONS = Statement(
    f"{_CONVERSATION_SELECT} WHERE status = {{status:String}}",
    {"status": ConversationStatus.ARCHIVED.value},
)


# (condition, parameter name, value): the condition applies when the value is not None.
Filter = tuple[str, str, Any]


def _add_filters(conditions: list[str], parameters: dict[str, Any], filters: list[Filter]) -> None:
    for condition, name, value in filters:
        if value is not None:
            conditions.append(condition)
            parameters[name] = value


def _window(column: str, since: datetime | None, until: datetime | None) -> list[Filter]:
    """`since` <= column < `until`, each bound applying when given."""
    return [
        (f"{column} >= {{since:DateTime64(6, 'UTC')}}", "since", since),
        (f"{column} < {{until:DateTime64(6, 'UTC')}}", "until", until),
    ]


def get_conversation(user_id: str, conversation_id: str) -> Statement:
    return Statement(
        f"{_CONVERSATION_SELECT}"
        " WHERE user_id = {user_id:String} AND conversation_id = {conversation_id:String}",
        {"user_id": user_id, "conversation_id": conversation_id},
    )


def get_event(user_id: str, conversation_id: str, event_id: int) -> Statement:
    return Statement(
        "SELECT payload FROM events FINAL"
        " WHERE conversation_id = {conversation_id:String} AND user_id = {user_id:String}"
        " AND id = {event_id:Int64}",
        {"user_id": user_id, "conversation_id": conversation_id, "event_id": event_id},
    )


def delete_conversation(user_id: str, conversation_id: str) -> tuple[Statement, ...]:
    """A deleted conversation's rows, gone (lightweight DELETE: masked at once, removed by the
    next merge). Its events go first: the conversations row is the record of a purge still to
    be done (see `purge`), so it goes last."""
    parameters = {"user_id": user_id, "conversation_id": conversation_id}
    where = " WHERE user_id = {user_id:String} AND conversation_id = {conversation_id:String}"
    return tuple(
        Statement(f"DELETE FROM {table}{where}", parameters)
        for table in ("events", "conversations")
    )


class IdWindow(NamedTuple):
    """The ids a search reads, both bounds inclusive; `high` None reads to the newest."""

    low: int
    high: int | None


def search_events(query: SearchEvents, window: IdWindow) -> Statement:
    """One page of a conversation's events plus one row more, which tells whether there are
    more, read over the ids of `window` (`search` says which)."""
    conditions = [
        "conversation_id = {conversation_id:String}",
        "user_id = {user_id:String}",
        "id >= {low:Int64}",
    ]
    parameters: dict[str, Any] = {
        "conversation_id": query.conversation_id,
        "user_id": query.user_id,
        "low": window.low,
        "limit": query.limit + 1,
    }
    optional: list[Filter] = [
        ("id <= {high:Int64}", "high", window.high),
        ("kind IN {kinds:Array(String)}", "kinds", query.kinds or None),
        ("kind NOT IN {exclude_kinds:Array(String)}", "exclude_kinds", query.exclude_kinds or None),
        ("source = {source:String}", "source", query.source),
        *_window("timestamp", query.since, query.until),
        ("positionCaseInsensitiveUTF8(text, {query:String}) > 0", "query", query.query or None),
    ]
    _add_filters(conditions, parameters, optional)
    order = "DESC" if query.reverse else "ASC"
    return Statement(
        "SELECT id, payload FROM events FINAL"
        f" WHERE {' AND '.join(conditions)}"
        f" ORDER BY id {order} LIMIT {{limit:UInt32}}",
        parameters,
    )


def list_conversations(query: ListConversations, after: tuple[datetime, str] | None) -> Statement:
    """A page of a user's conversations, newest first, starting after the cursor `after`."""
    conditions = ["user_id = {user_id:String}"]
    parameters: dict[str, Any] = {"user_id": query.user_id, "limit": query.limit + 1}
    optional: list[Filter] = [
        ("status = {status:String}", "status", query.status),
        (
            "status NOT IN {exclude_statuses:Array(String)}",
            "exclude_statuses",
            [status.value for status in query.exclude_statuses] or None,
        ),
        ("repository = {repository:String}", "repository", query.repository),
        *_window("created_at", query.created_after, query.created_before),
        (
            "positionCaseInsensitiveUTF8(title, {title_contains:String}) > 0",
            "title_contains",
            query.title_contains or None,
        ),
    ]
    _add_filters(conditions, parameters, optional)
    if after is not None:
        conditions.append(
            "(created_at < {cursor_created_at:DateTime64(6, 'UTC')}"
            " OR (created_at = {cursor_created_at:DateTime64(6, 'UTC')}"
            " AND conversation_id < {cursor_conversation_id:String}))"
        )
        parameters["cursor_created_at"], parameters["cursor_conversation_id"] = after
    return Statement(
        f"{_CONVERSATION_SELECT} WHERE {' AND '.join(conditions)}"
        " ORDER BY created_at DESC, conversation_id DESC LIMIT {limit:UInt32}",
        parameters,
    )


# --- analytics: one statement each, always scoped to one user ---------------------------------

_COST_KEYS: dict[CostGroupBy, str] = {
    CostGroupBy.USER: "user_id",
    CostGroupBy.DAY: "toString(toDate(timestamp, 'UTC'))",
    CostGroupBy.MODEL: "model",
    CostGroupBy.CONVERSATION: "conversation_id",
}

# A Float64 sum depends on the order ClickHouse meets the rows in (parts, threads), so the same
# log could give costs that differ in the last bits, e.g. before and after a rebuild. Summed as
# decimals (to a pico-dollar) the result is exact and the same in any order.
_EXACT_COST_SUM = "toFloat64(sum(toDecimal128(cost, 12)))"


def cost_analytics(query: CostAnalytics) -> Statement:
    """Rows: key, cost, llm_calls, prompt_tokens, completion_tokens, conversations."""
    conditions = ["user_id = {user_id:String}", "kind = {kind:String}"]
    parameters: dict[str, Any] = {"user_id": query.user_id, "kind": LLMMetrics.__name__}
    _add_filters(conditions, parameters, _window("timestamp", query.since, query.until))
    return Statement(
        f"SELECT {_COST_KEYS[query.group_by]} AS key, {_EXACT_COST_SUM}, count(),"
        " sum(prompt_tokens), sum(completion_tokens), uniqExact(conversation_id)"
        f" FROM events FINAL WHERE {' AND '.join(conditions)}"
        " GROUP BY key ORDER BY key",
        parameters,
    )


def duration_analytics(query: DurationAnalytics) -> Statement:
    """Rows: status, conversations, mean, p50, p90, max seconds (NULL unless the status ended).

    The inner query folds each conversation's lifecycle events into (created_at, outcome,
    ended_at); it reads only the two lifecycle kinds, so the JSON is parsed for few rows.
    """
    outcome_changed = "kind = {status_changed:String} AND status != {archived:String}"
    conditions = ["has_created"]
    parameters: dict[str, Any] = {
        "user_id": query.user_id,
        "created": ConversationCreated.__name__,
        "status_changed": ConversationStatusChanged.__name__,
        "archived": ConversationStatus.ARCHIVED.value,
        "initial": ConversationStatus.QUEUED.value,
        "ended": sorted(status.value for status in ENDED_STATUSES),  # only these have a duration
    }
    _add_filters(conditions, parameters, _window("created_at", query.since, query.until))
    # Aggregated as whole microseconds, so the mean does not depend on the order of the rows.
    stats = ", ".join(
        f"if(outcome IN {{ended:Array(String)}}, {aggregate}(micros) / 1e6, NULL)"
        for aggregate in (
            "avg",
            "quantileExactInclusive(0.5)",
            "quantileExactInclusive(0.9)",
            "max",
        )
    )
    return Statement(
        f"SELECT outcome, count(), {stats} FROM ("
        " SELECT conversation_id,"
        " countIf(kind = {created:String}) > 0 AS has_created,"
        " minIf(timestamp, kind = {created:String}) AS created_at,"
        f" argMaxIf(status, id, {outcome_changed}) AS last_status,"
        " if(last_status = '', {initial:String}, last_status) AS outcome,"
        f" argMaxIf(timestamp, id, {outcome_changed}) AS ended_at,"
        " dateDiff('microsecond', created_at, ended_at) AS micros"
        " FROM ("
        " SELECT conversation_id, id, kind, timestamp,"
        " JSONExtractString(payload, 'status') AS status"
        " FROM events FINAL WHERE user_id = {user_id:String}"
        " AND kind IN ({created:String}, {status_changed:String})"
        " ) GROUP BY conversation_id"
        f") WHERE {' AND '.join(conditions)} GROUP BY outcome ORDER BY outcome",
        parameters,
    )


def event_kind_counts(query: EventKindCounts) -> Statement:
    """Rows: kind, events, conversations."""
    conditions = ["user_id = {user_id:String}"]
    parameters: dict[str, Any] = {"user_id": query.user_id}
    _add_filters(
        conditions,
        parameters,
        [
            (
                "conversation_id = {conversation_id:String}",
                "conversation_id",
                query.conversation_id,
            ),
            *_window("timestamp", query.since, query.until),
        ],
    )
    return Statement(
        "SELECT kind, count() AS events, uniqExact(conversation_id)"
        f" FROM events FINAL WHERE {' AND '.join(conditions)}"
        " GROUP BY kind ORDER BY events DESC, kind ASC",
        parameters,
    )


def resource_analytics(query: ResourceAnalytics) -> Statement:
    """Rows: conversation_id, samples, cpu_seconds, memory_peak_bytes, max_pids,
    max_disk_bytes, last_measured_at.

    A sample's `cpu_seconds` counts from its sandbox's start, so the CPU time is the sum of the
    rises between samples in log order, where a fall means a new sandbox whose figure counts
    whole.
    """
    conditions = ["user_id = {user_id:String}", "kind = {kind:String}"]
    parameters: dict[str, Any] = {
        "user_id": query.user_id,
        "kind": ResourceUsage.__name__,
        "limit": query.limit,
    }
    _add_filters(conditions, parameters, _window("timestamp", query.since, query.until))
    cpu = "JSONExtractFloat(payload, 'cpu_seconds')"
    cpus = f"arrayMap(x -> x.2, arraySort(groupArray((id, {cpu}))))"
    rises = "arrayPopFront(arrayDifference(arrayPushFront(cpus, 0.)))"
    peak = (
        "max(greatest(JSONExtractUInt(payload, 'memory_peak_bytes'),"
        " JSONExtractUInt(payload, 'memory_bytes')))"
    )
    return Statement(
        "SELECT conversation_id, count(),"
        f" arraySum(arrayMap((c, d) -> if(d >= 0, d, c), {cpus} AS cpus, {rises})),"
        f" {peak} AS memory_peak,"
        " max(JSONExtractUInt(payload, 'pids')), max(JSONExtractUInt(payload, 'disk_bytes')),"
        " max(timestamp)"
        f" FROM events FINAL WHERE {' AND '.join(conditions)}"
        " GROUP BY conversation_id"
        " ORDER BY memory_peak DESC, conversation_id ASC LIMIT {limit:UInt32}",
        parameters,
    )


def failing_commands(query: FailingCommands) -> Statement:
    """Rows: command, failures, runs, conversations, last_failed_at, last_exit_code.

    `exit_code` is NULL for a command still running after a soft timeout, so it is no run.
    """
    conditions = [
        "user_id = {user_id:String}",
        "kind = {kind:String}",
        "exit_code IS NOT NULL",
    ]
    parameters: dict[str, Any] = {
        "user_id": query.user_id,
        "kind": CmdOutputObservation.__name__,
        "limit": query.limit,
    }
    _add_filters(conditions, parameters, _window("timestamp", query.since, query.until))
    failed = "exit_code != 0"
    return Statement(
        f"SELECT command, countIf({failed}) AS failures, count(),"
        f" uniqExactIf(conversation_id, {failed}), maxIf(timestamp, {failed}),"
        f" assumeNotNull(argMaxIf(exit_code, (timestamp, conversation_id, id), {failed}))"
        f" FROM events FINAL WHERE {' AND '.join(conditions)}"
        " GROUP BY command HAVING failures > 0"
        " ORDER BY failures DESC, command ASC LIMIT {limit:UInt32}",
        parameters,
    )
