"""Row extraction, SQL building and reply building, without any broker or database."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from taskbus.contracts.events import (
    CmdOutputObservation,
    EventSource,
    LLMMetrics,
    TaskItem,
    TaskTrackingAction,
    ThinkAction,
    decode_event,
    encode_event,
)
from taskbus.contracts.queries import (
    ConversationInfo,
    EventPage,
    EventReply,
    ListConversations,
    QueryError,
    SearchEvents,
)
from taskbus.contracts.specs import NATS_DEFAULT_MAX_PAYLOAD
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store import replies, sql
from taskbus.event_store.rows import (
    conversation_from_row,
    conversation_row,
    event_row,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW = datetime(2025, 1, 3, tzinfo=UTC)


def row_of(event: object) -> object:
    stored = encode_event(event)  # type: ignore[arg-type]
    return event_row(stored, decode_event(stored), "alice", received_at=NOW, ingested_at=NOW)


def test_event_row_keeps_the_exact_stored_json_and_extracts_analytics_columns() -> None:
    metrics = LLMMetrics(
        conversation_id="c",
        source=EventSource.AGENT,
        id=4,
        cause=3,
        timestamp=T0,
        model="openai/scripted",
        prompt_tokens=100,
        completion_tokens=20,
        cost=0.125,
    )
    stored = encode_event(metrics)
    row = event_row(stored, decode_event(stored), "alice", received_at=NOW, ingested_at=NOW)
    assert row.payload == stored
    assert (row.conversation_id, row.id, row.kind, row.source, row.cause) == (
        "c",
        4,
        "LLMMetrics",
        "agent",
        3,
    )
    assert (row.timestamp, row.user_id) == (T0, "alice")
    assert (row.cost, row.model, row.prompt_tokens, row.completion_tokens) == (
        0.125,
        "openai/scripted",
        100,
        20,
    )


def test_event_row_of_a_command_observation_has_command_and_exit_code() -> None:
    observation = CmdOutputObservation(
        conversation_id="c",
        source=EventSource.ENVIRONMENT,
        id=2,
        content="boom",
        command="make",
        exit_code=2,
    )
    row = row_of(observation)
    assert (row.command, row.exit_code) == ("make", 2)  # type: ignore[attr-defined]


def test_searchable_text_is_every_string_value_but_not_keys_or_envelope() -> None:
    action = TaskTrackingAction(
        conversation_id="conv-secret-id",
        source=EventSource.AGENT,
        command="plan",
        task_list=[TaskItem(id="1", title='Write "quoted"\nstuff', notes="Ünïcode")],
    )
    text = row_of(action).text  # type: ignore[attr-defined]
    assert 'Write "quoted"\nstuff' in text
    assert "Ünïcode" in text
    assert "task_list" not in text
    assert "conv-secret-id" not in text


def test_unknown_kinds_become_rows_too() -> None:
    class FutureEvent(ThinkAction):
        pass

    row = row_of(FutureEvent(conversation_id="c", source=EventSource.AGENT, id=7, thought="later"))
    assert (row.kind, row.id, row.text) == ("FutureEvent", 7, "later")  # type: ignore[attr-defined]


def test_conversation_rows_round_trip() -> None:
    info = ConversationInfo(
        conversation_id="c",
        user_id="u",
        title="t",
        status=ConversationStatus.RUNNING,
        repository=None,
        created_at=T0,
        updated_at=NOW,
        accumulated_cost=1.5,
        event_count=3,
        last_event_id=2,
    )
    assert conversation_from_row(tuple(conversation_row(info))) == info


def test_user_input_only_ever_reaches_sql_as_parameters() -> None:
    hostile = "x' OR 1=1 --"
    search = SearchEvents(
        user_id=hostile,
        conversation_id=hostile,
        kinds=[hostile],
        exclude_kinds=[hostile],
        query=hostile,
        source=EventSource.USER,
        since=T0,
        until=NOW,
        end_id=9,
    )
    listing = ListConversations(user_id=hostile, repository=hostile, title_contains=hostile)
    for statement in (
        sql.search_events(search, sql.IdWindow(0, 9)),
        sql.list_conversations(listing, (T0, hostile)),
        sql.get_conversation(hostile, hostile),
        sql.get_event(hostile, hostile, 1),
    ):
        assert hostile not in statement.sql
        assert hostile in str(statement.parameters.values())


def test_search_asks_for_one_row_more_than_the_page() -> None:
    whole = sql.IdWindow(0, None)
    statement = sql.search_events(SearchEvents(user_id="u", conversation_id="c", limit=10), whole)
    assert statement.parameters["limit"] == 11
    assert "ORDER BY id ASC" in statement.sql
    reverse = sql.search_events(SearchEvents(user_id="u", conversation_id="c", reverse=True), whole)
    assert "ORDER BY id DESC" in reverse.sql


@pytest.mark.parametrize(
    ("reverse", "ids", "expected_next"),
    [
        (False, [3, 5, 8], 6),  # forward: continue from after the last returned id
        (True, [8, 5, 3], 4),  # reverse: continue below the last returned id (next end_id)
    ],
)
def test_event_page_next_start_id(reverse: bool, ids: list[int], expected_next: int) -> None:
    query = SearchEvents(user_id="u", conversation_id="c", limit=2, reverse=reverse)
    page = replies.event_page(query, [(i, b'{"id":%d}' % i) for i in ids])
    assert isinstance(page, EventPage)
    assert page.has_more
    assert page.next_start_id == expected_next
    assert [msgspec.json.decode(raw)["id"] for raw in page.events] == ids[:2]


def test_last_event_page_has_no_next() -> None:
    query = SearchEvents(user_id="u", conversation_id="c", limit=5)
    page = replies.event_page(query, [(1, b"{}")])
    assert isinstance(page, EventPage)
    assert (page.has_more, page.next_start_id, len(page.events)) == (False, None, 1)


def test_cursor_round_trips_and_rejects_garbage() -> None:
    info = ConversationInfo(
        conversation_id="c-9",
        user_id="u",
        title="t",
        status=ConversationStatus.QUEUED,
        created_at=T0,
        updated_at=T0,
    )
    assert replies.decode_cursor(replies.encode_cursor(info)) == (T0, "c-9")
    for garbage in ("not-a-cursor", "", "!!!", "WzEsMl0"):
        with pytest.raises(replies.InvalidCursor):
            replies.decode_cursor(garbage)


# --- replies never exceed the bus' max_payload ---------------------------------------------------


def _event(event_id: int, size: int) -> tuple[int, bytes]:
    return event_id, b'{"id":%d,"text":"%s"}' % (event_id, b"x" * size)


@pytest.mark.parametrize("reverse", [False, True])
def test_an_event_page_too_large_for_one_message_is_cut_and_continues(reverse: bool) -> None:
    max_bytes = 64 * 1024
    ids = list(range(20, 0, -1)) if reverse else list(range(1, 21))
    query = SearchEvents(user_id="u", conversation_id="c", limit=100, reverse=reverse)
    page = replies.event_page(query, [_event(i, 10_000) for i in ids], max_bytes)
    assert isinstance(page, EventPage)
    assert 0 < len(page.events) < 20 and page.has_more
    assert len(replies.encode_reply(page, max_bytes)) <= max_bytes
    last = msgspec.json.decode(page.events[-1])["id"]
    assert page.next_start_id == (last - 1 if reverse else last + 1)


def test_an_event_larger_than_one_message_is_a_typed_error() -> None:
    query = SearchEvents(user_id="u", conversation_id="c")
    error = replies.event_page(query, [_event(1, 70_000)], 64 * 1024)
    assert isinstance(error, QueryError)
    assert (error.status, error.kind) == (422, "reply-too-large")


def test_a_conversation_page_too_large_for_one_message_is_cut_with_a_cursor() -> None:
    infos = [
        ConversationInfo(
            conversation_id=f"c{n:03}",
            user_id="u",
            title="\x01" * 200,  # 6 bytes a character in JSON
            repository="\x01" * 2048,
            status=ConversationStatus.QUEUED,
            created_at=T0,
            updated_at=T0,
        )
        for n in range(101)
    ]
    page = replies.conversation_page(ListConversations(user_id="u", limit=100), infos)
    assert 0 < len(page.conversations) < 100
    assert page.next_page_id == replies.encode_cursor(page.conversations[-1])
    assert len(replies.encode_reply(page)) <= NATS_DEFAULT_MAX_PAYLOAD


def test_any_other_reply_too_large_becomes_a_typed_error() -> None:
    huge = EventReply(event=msgspec.Raw(b'"%s"' % (b"x" * 2000)))
    error = msgspec.json.decode(replies.encode_reply(huge, 1000), type=QueryError)
    assert (error.status, error.kind) == (422, "reply-too-large")
    small = EventReply(event=msgspec.Raw(b"{}"))
    assert replies.encode_reply(small, 1000) == msgspec.json.encode(small)
