"""Ingest of a real JetStream log into real chDB, and every query over NATS request-reply.

The module appends realistic conversations for two users once (with EventAppender, as the
services do), waits until the KV projection has caught up, and then queries what was stored.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    AgentFinishAction,
    AgentStateChanged,
    CmdOutputChunk,
    CmdOutputObservation,
    CmdRunAction,
    ConversationCreated,
    ConversationStatusChanged,
    Event,
    EventSource,
    FileEditAction,
    FileEditObservation,
    LLMMetrics,
    MessageAction,
    RuntimeRequested,
    RuntimeStatusChanged,
    ThinkAction,
    UnknownEvent,
    decode_event,
    encode_event,
)
from taskbus.contracts.partitions import partition_of
from taskbus.contracts.queries import (
    ConversationInfo,
    ConversationPage,
    ConversationReply,
    EventPage,
    EventReply,
    GetConversation,
    GetEvent,
    ListConversations,
    QueryError,
    Reply,
    SearchEvents,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus, RuntimeStatus
from taskbus.event_store import ingest
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.sql import Statement
from taskbus.event_store.status_kv import ConversationStatusKV

pytestmark = pytest.mark.usefixtures("event_store")

R = TypeVar("R", bound=Reply)
WaitUntil = Callable[[Callable[[], Awaitable[bool]], str], Awaitable[None]]
IngesterFactory = Callable[[str | None], Awaitable[Ingester]]

T0 = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
AGENT, USER, ENV = EventSource.AGENT, EventSource.USER, EventSource.ENVIRONMENT


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class FutureEvent(ThinkAction):
    """A kind this version of the contracts does not know (it is not in AnyEvent)."""


def task_events(
    cid: str, user_id: str, title: str, repository: str, commands: int, final: ConversationStatus
) -> list[Event]:
    """A conversation as session-manager and runtime-runner would log it."""
    events: list[Event] = [
        ConversationCreated(
            conversation_id=cid,
            source=USER,
            user_id=user_id,
            title=title,
            spec=ConversationSpec(initial_user_msg=title, repository=repository, priority=1),
        ),
        ConversationStatusChanged(
            conversation_id=cid, source=ENV, status=ConversationStatus.STARTING
        ),
        MessageAction(conversation_id=cid, source=USER, content=f"{title}. It's urgent!"),
        RuntimeRequested(conversation_id=cid, source=ENV, user_id=user_id, repository=repository),
        RuntimeStatusChanged(conversation_id=cid, source=ENV, status=RuntimeStatus.READY),
        ConversationStatusChanged(
            conversation_id=cid, source=ENV, status=ConversationStatus.RUNNING
        ),
        AgentStateChanged(conversation_id=cid, source=ENV, agent_state=AgentState.RUNNING),
    ]
    for n in range(commands):
        command = f"echo MARKER-{n}" if n == 2 else f"pytest -k case_{n}"
        events += [
            LLMMetrics(
                conversation_id=cid,
                source=AGENT,
                model="openai/scripted",
                cost=0.01,
                accumulated_cost=0.01 * (n + 1),
            ),
            CmdRunAction(conversation_id=cid, source=AGENT, command=command),
            CmdOutputChunk(conversation_id=cid, source=ENV, content=f"running {n}"),
            CmdOutputObservation(
                conversation_id=cid,
                source=ENV,
                command=command,
                content=f"MARKER-{n}" if n == 2 else "1 passed",
                exit_code=n % 2,
            ),
        ]
    events += [
        FileEditAction(conversation_id=cid, source=AGENT, command="create", path="/w/a.py"),
        FileEditObservation(conversation_id=cid, source=ENV, path="/w/a.py", content="ok"),
        AgentFinishAction(conversation_id=cid, source=AGENT, final_thought="done"),
        AgentStateChanged(conversation_id=cid, source=ENV, agent_state=AgentState.FINISHED),
        ConversationStatusChanged(
            conversation_id=cid, source=ENV, status=final, reason=f"{final.value.lower()} by test"
        ),
    ]
    return events


def with_times(events: Sequence[Event], start: datetime) -> list[Event]:
    """Event i happens at start + i seconds, so time filters have exact expectations."""
    return [
        msgspec.structs.replace(e, timestamp=start + timedelta(seconds=i))
        for i, e in enumerate(events)
    ]


class Dataset(msgspec.Struct):
    alice: str
    bob: str
    long: str  # alice's long conversation
    others: list[str]  # alice's other conversations, oldest first
    bobs: str
    future: str  # alice's conversation with an unknown event kind
    logged: dict[str, list[Event]]  # conversation_id -> events as appended (with ids)


@pytest.fixture(scope="module")
async def dataset(module_js: JetStreamContext, wait_until: WaitUntil) -> Dataset:
    alice, bob = unique("alice"), unique("bob")
    long, bobs, future = unique("long"), unique("bobs"), unique("future")
    others = [unique("other") for _ in range(4)]
    plans: dict[str, list[Event]] = {
        long: with_times(
            task_events(
                long, alice, "Fix the flaky login test", "octo/app", 12, ConversationStatus.FINISHED
            ),
            T0,
        ),
        bobs: with_times(
            task_events(bobs, bob, "Bob's task", "bob/lib", 1, ConversationStatus.FINISHED), T0
        ),
        future: with_times(
            [
                *task_events(
                    future, alice, "Future proof", "octo/app", 0, ConversationStatus.STOPPED
                ),
                FutureEvent(conversation_id=future, source=AGENT, thought="from a newer writer"),
            ],
            T0 + timedelta(hours=5),
        ),
    }
    # Alice's other conversations: one hour apart, except the last two which share created_at.
    for n, (cid, status, repository) in enumerate(
        zip(
            others,
            [
                ConversationStatus.FINISHED,
                ConversationStatus.ERROR,
                ConversationStatus.FINISHED,
                ConversationStatus.ERROR,
            ],
            ["octo/app", "octo/lib", "octo/lib", "octo/app"],
            strict=True,
        )
    ):
        start = T0 + timedelta(hours=min(n, 2) + 1)
        plans[cid] = with_times(
            task_events(cid, alice, f"Other task {n}", repository, 1, status), start
        )

    appender = EventAppender(module_js)
    appended = await asyncio.gather(*(appender.append_all(events) for events in plans.values()))
    logged = {events[0].conversation_id: events for events in appended}
    kv = await module_js.key_value(subjects.CONVERSATIONS_BUCKET)

    async def projected() -> bool:
        for cid, events in logged.items():
            try:
                entry = await kv.get(cid)
            except Exception:
                return False
            assert entry.value is not None
            if (
                msgspec.json.decode(entry.value, type=ConversationInfo).last_event_id
                != events[-1].id
            ):
                return False
        return True

    await wait_until(projected, "the KV projection to catch up")
    return Dataset(
        alice=alice, bob=bob, long=long, others=others, bobs=bobs, future=future, logged=logged
    )


def ids_of(page: EventPage) -> list[int]:
    return [msgspec.json.decode(raw)["id"] for raw in page.events]


async def search(queries: QueryClient, **fields: object) -> EventPage:
    reply = await queries.ask(SearchEvents(**fields), EventPage)  # type: ignore[arg-type]
    assert isinstance(reply, EventPage), reply
    return reply


async def all_pages(queries: QueryClient, **fields: object) -> list[list[int]]:
    """Follow next_start_id to the end; reverse pages continue through end_id."""
    pages: list[list[int]] = []
    while True:
        page = await search(queries, **fields)
        pages.append(ids_of(page))
        assert len(pages[-1]) <= int(fields.get("limit", 20))  # type: ignore[call-overload]
        if not page.has_more:
            assert page.next_start_id is None
            return pages
        assert page.next_start_id is not None
        fields["end_id" if fields.get("reverse") else "start_id"] = page.next_start_id


def expected_ids(events: Sequence[Event], keep: Callable[[Event], bool]) -> list[int]:
    return [e.id for e in events if keep(e)]


# --- ingest and the status projection ------------------------------------------------------------


async def test_kv_projection_has_the_final_status_of_each_conversation(
    module_js: JetStreamContext, dataset: Dataset
) -> None:
    kv = await module_js.key_value(subjects.CONVERSATIONS_BUCKET)
    entry = await kv.get(dataset.long)
    assert entry.value is not None
    info = msgspec.json.decode(entry.value, type=ConversationInfo)
    events = dataset.logged[dataset.long]
    assert info.user_id == dataset.alice
    assert info.title == "Fix the flaky login test"
    assert info.repository == "octo/app"
    assert info.priority == 1
    assert (info.status, info.status_reason) == (ConversationStatus.FINISHED, "finished by test")
    assert info.agent_state is AgentState.FINISHED
    assert info.accumulated_cost == pytest.approx(0.12)
    assert (info.event_count, info.last_event_id) == (len(events), len(events) - 1)
    assert (info.created_at, info.updated_at) == (T0, events[-1].timestamp)

    stopped = await kv.get(dataset.future)
    assert stopped.value is not None
    assert (
        msgspec.json.decode(stopped.value, type=ConversationInfo).status
        is ConversationStatus.STOPPED
    )


async def test_get_conversation_answers_the_projection_to_its_owner_only(
    queries: QueryClient, module_js: JetStreamContext, dataset: Dataset
) -> None:
    reply = await queries.ask(
        GetConversation(user_id=dataset.alice, conversation_id=dataset.long), ConversationReply
    )
    assert isinstance(reply, ConversationReply)
    kv_entry = await (await module_js.key_value(subjects.CONVERSATIONS_BUCKET)).get(dataset.long)
    assert kv_entry.value is not None
    assert reply.conversation == msgspec.json.decode(kv_entry.value, type=ConversationInfo)

    for user_id, cid in [
        (dataset.bob, dataset.long),
        (dataset.alice, dataset.bobs),
        (dataset.alice, "nope"),
    ]:
        denied = await queries.ask(
            GetConversation(user_id=user_id, conversation_id=cid), ConversationReply
        )
        assert isinstance(denied, QueryError) and denied.status == 404


# --- search_events -------------------------------------------------------------------------------


async def test_events_are_served_as_the_exact_stored_json(
    queries: QueryClient, dataset: Dataset
) -> None:
    events = dataset.logged[dataset.long]
    page = await search(queries, user_id=dataset.alice, conversation_id=dataset.long, limit=100)
    assert [bytes(raw) for raw in page.events] == [encode_event(e) for e in events]
    assert (page.has_more, page.next_start_id) == (False, None)


async def test_forward_pages_cover_every_event_once(queries: QueryClient, dataset: Dataset) -> None:
    pages = await all_pages(queries, user_id=dataset.alice, conversation_id=dataset.long, limit=7)
    flat = [i for page in pages for i in page]
    assert flat == list(range(len(dataset.logged[dataset.long])))
    assert all(len(page) == 7 for page in pages[:-1])


async def test_reverse_pages_cover_every_event_once_newest_first(
    queries: QueryClient, dataset: Dataset
) -> None:
    pages = await all_pages(
        queries, user_id=dataset.alice, conversation_id=dataset.long, limit=9, reverse=True
    )
    flat = [i for page in pages for i in page]
    assert flat == list(reversed(range(len(dataset.logged[dataset.long]))))


async def test_start_and_end_ids_are_inclusive(queries: QueryClient, dataset: Dataset) -> None:
    common = {"user_id": dataset.alice, "conversation_id": dataset.long, "start_id": 3, "end_id": 6}
    assert ids_of(await search(queries, **common)) == [3, 4, 5, 6]
    assert ids_of(await search(queries, **common, reverse=True, limit=2)) == [6, 5]


async def test_kind_and_source_filters(queries: QueryClient, dataset: Dataset) -> None:
    events = dataset.logged[dataset.long]
    common = {"user_id": dataset.alice, "conversation_id": dataset.long, "limit": 100}
    runs = await search(queries, **common, kinds=["CmdRunAction", "AgentFinishAction"])
    assert ids_of(runs) == expected_ids(
        events, lambda e: isinstance(e, CmdRunAction | AgentFinishAction)
    )
    quiet = await search(queries, **common, exclude_kinds=["CmdOutputChunk", "LLMMetrics"])
    assert ids_of(quiet) == expected_ids(
        events, lambda e: not isinstance(e, CmdOutputChunk | LLMMetrics)
    )
    by_user = await search(queries, **common, source="user")
    assert ids_of(by_user) == expected_ids(events, lambda e: e.source is USER)
    assert len(by_user.events) == 2


async def test_time_range_is_since_inclusive_until_exclusive(
    queries: QueryClient, dataset: Dataset
) -> None:
    page = await search(
        queries,
        user_id=dataset.alice,
        conversation_id=dataset.long,
        since=T0 + timedelta(seconds=5),
        until=T0 + timedelta(seconds=10),
    )
    assert ids_of(page) == [5, 6, 7, 8, 9]


async def test_text_query_is_a_case_insensitive_substring(
    queries: QueryClient, dataset: Dataset
) -> None:
    common = {"user_id": dataset.alice, "conversation_id": dataset.long}
    marker = await search(queries, **common, query="marker-2")
    kinds = [msgspec.json.decode(raw)["kind"] for raw in marker.events]
    assert kinds == ["CmdRunAction", "CmdOutputObservation"]
    quoted = await search(queries, **common, query="IT'S URGENT")
    assert [msgspec.json.decode(raw)["kind"] for raw in quoted.events] == ["MessageAction"]
    assert (await search(queries, **common, query="no such text")).events == []
    # Field names are not text: "command" is a key of every CmdRunAction but in no value.
    assert (await search(queries, **common, query='"command"')).events == []


async def test_filtered_pages_have_no_gaps_or_duplicates(
    queries: QueryClient, dataset: Dataset
) -> None:
    events = dataset.logged[dataset.long]
    kinds = ["CmdRunAction", "CmdOutputObservation"]
    expected = expected_ids(events, lambda e: e.kind in kinds)
    common = {"user_id": dataset.alice, "conversation_id": dataset.long, "kinds": kinds, "limit": 5}
    forward = await all_pages(queries, **common)
    backward = await all_pages(queries, **common, reverse=True)
    assert [i for page in forward for i in page] == expected
    assert [i for page in backward for i in page] == expected[::-1]


async def test_events_of_unknown_kinds_are_stored_and_served(
    queries: QueryClient, dataset: Dataset
) -> None:
    page = await search(
        queries, user_id=dataset.alice, conversation_id=dataset.future, kinds=["FutureEvent"]
    )
    assert len(page.events) == 1
    decoded = decode_event(bytes(page.events[0]))
    assert isinstance(decoded, UnknownEvent)
    assert decoded.id == dataset.logged[dataset.future][-1].id


async def test_other_users_and_unknown_conversations_answer_404(
    queries: QueryClient, dataset: Dataset
) -> None:
    for user_id, cid in [(dataset.bob, dataset.long), (dataset.alice, "missing-conversation")]:
        reply = await queries.ask(SearchEvents(user_id=user_id, conversation_id=cid), EventPage)
        assert isinstance(reply, QueryError) and reply.status == 404
    # The owner with filters that match nothing gets an empty page, not a 404.
    empty = await search(
        queries, user_id=dataset.alice, conversation_id=dataset.long, kinds=["Nothing"]
    )
    assert (empty.events, empty.has_more) == ([], False)


async def test_invalid_queries_answer_422_with_the_reason(
    queries: QueryClient, dataset: Dataset
) -> None:
    base = {"user_id": dataset.alice, "conversation_id": dataset.long}
    for body, mentions in [
        ({**base, "limit": 1000}, "limit"),
        ({**base, "colour": "red"}, "colour"),
        ({"conversation_id": dataset.long}, "user_id"),
    ]:
        reply = await queries.ask_raw("search_events", msgspec.json.encode(body), EventPage)
        assert isinstance(reply, QueryError) and reply.status == 422
        assert mentions in reply.detail
    garbage = await queries.ask_raw("get_event", b"{not json", EventReply)
    assert isinstance(garbage, QueryError) and garbage.status == 422


# --- get_event -----------------------------------------------------------------------------------


async def test_get_event(queries: QueryClient, dataset: Dataset) -> None:
    event = dataset.logged[dataset.long][8]
    reply = await queries.ask(
        GetEvent(user_id=dataset.alice, conversation_id=dataset.long, event_id=8), EventReply
    )
    assert isinstance(reply, EventReply)
    assert bytes(reply.event) == encode_event(event)

    missing = await queries.ask(
        GetEvent(user_id=dataset.alice, conversation_id=dataset.long, event_id=999), EventReply
    )
    assert isinstance(missing, QueryError) and (missing.status, missing.title) == (
        404,
        "Event not found",
    )
    foreign = await queries.ask(
        GetEvent(user_id=dataset.bob, conversation_id=dataset.long, event_id=8), EventReply
    )
    assert isinstance(foreign, QueryError) and (foreign.status, foreign.title) == (
        404,
        "Conversation not found",
    )


# --- list_conversations --------------------------------------------------------------------------


async def list_all(queries: QueryClient, **fields: object) -> list[list[str]]:
    pages: list[list[str]] = []
    page_id: str | None = None
    while True:
        reply = await queries.ask(ListConversations(page_id=page_id, **fields), ConversationPage)  # type: ignore[arg-type]
        assert isinstance(reply, ConversationPage), reply
        pages.append([c.conversation_id for c in reply.conversations])
        if reply.next_page_id is None:
            return pages
        page_id = reply.next_page_id


async def test_list_is_newest_first_and_pages_without_gaps(
    queries: QueryClient, dataset: Dataset
) -> None:
    one_page = await list_all(queries, user_id=dataset.alice, limit=100)
    # future (T0+5h), then others[2:] (both T0+3h: the tie is broken by id, descending),
    # then others[1] (T0+2h), others[0] (T0+1h) and long (T0).
    tied = sorted(dataset.others[2:], reverse=True)
    assert one_page == [[dataset.future, *tied, dataset.others[1], dataset.others[0], dataset.long]]
    pages = await list_all(queries, user_id=dataset.alice, limit=2)
    assert [len(p) for p in pages] == [2, 2, 2]
    assert [cid for page in pages for cid in page] == one_page[0]
    assert await list_all(queries, user_id=dataset.bob) == [[dataset.bobs]]


async def test_list_filters(queries: QueryClient, dataset: Dataset) -> None:
    alice = dataset.alice

    async def listed(**fields: object) -> set[str]:
        return {cid for page in await list_all(queries, user_id=alice, **fields) for cid in page}

    assert await listed(status="ERROR") == {dataset.others[1], dataset.others[3]}
    # Every conversation was RUNNING once; FINAL filters the latest row, not the older ones.
    assert await listed(status="RUNNING") == set()
    assert await listed(repository="octo/lib") == {dataset.others[1], dataset.others[2]}
    assert await listed(
        created_after=T0 + timedelta(hours=1), created_before=T0 + timedelta(hours=3)
    ) == {dataset.others[0], dataset.others[1]}
    assert await listed(title_contains="FLAKY login") == {dataset.long}
    assert await listed(status="ERROR", repository="octo/app") == {dataset.others[3]}


async def test_list_rejects_a_forged_page_id(queries: QueryClient, dataset: Dataset) -> None:
    reply = await queries.ask(
        ListConversations(user_id=dataset.alice, page_id="bogus"), ConversationPage
    )
    assert isinstance(reply, QueryError) and reply.status == 422


# --- KV never moves backwards --------------------------------------------------------------------


async def test_status_kv_never_moves_a_conversation_backwards(module_js: JetStreamContext) -> None:
    kv = await module_js.key_value(subjects.CONVERSATIONS_BUCKET)
    base = ConversationInfo(
        conversation_id=unique("kv"),
        user_id="u",
        title="t",
        status=ConversationStatus.RUNNING,
        created_at=T0,
        updated_at=T0,
    )

    def at(last_event_id: int) -> ConversationInfo:
        return msgspec.structs.replace(
            base, last_event_id=last_event_id, event_count=last_event_id + 1
        )

    async def stored_position() -> int:
        entry = await kv.get(base.conversation_id)
        assert entry.value is not None
        return msgspec.json.decode(entry.value, type=ConversationInfo).last_event_id

    writer, other_writer = ConversationStatusKV(kv), ConversationStatusKV(kv)
    await writer.publish(at(3))
    await other_writer.publish(at(1))  # stale: skipped after reading the newer value
    assert await stored_position() == 3
    await other_writer.publish(at(7))
    await writer.publish(at(5))  # its cached revision is stale: conflict, re-read, skip
    assert await stored_position() == 7
    await writer.publish(at(8))
    assert await stored_position() == 8


# --- redelivery ----------------------------------------------------------------------------------


async def test_reingesting_the_whole_log_duplicates_nothing(
    queries: QueryClient,
    clickhouse: ClickHouse,
    module_js: JetStreamContext,
    start_ingester: IngesterFactory,
    wait_until: WaitUntil,
    dataset: Dataset,
) -> None:
    """A fresh consumer replays every event, as a crash between insert and ack would."""
    events = dataset.logged[dataset.long]
    raw_count = Statement(
        "SELECT count() FROM events WHERE conversation_id = {cid:String}", {"cid": dataset.long}
    )
    kv = await module_js.key_value(subjects.CONVERSATIONS_BUCKET)
    before = await kv.get(dataset.long)
    await clickhouse.select(Statement("SYSTEM STOP MERGES events", {}))
    try:
        replay = await start_ingester(None)
        try:

            async def replayed() -> bool:
                rows = await clickhouse.select(raw_count)
                return bool(rows[0][0] == 2 * len(events))

            await wait_until(replayed, "the replay to re-insert the conversation")
        finally:
            await replay.stop()
        page = await search(queries, user_id=dataset.alice, conversation_id=dataset.long, limit=100)
        assert ids_of(page) == list(range(len(events)))
        reply = await queries.ask(
            GetConversation(user_id=dataset.alice, conversation_id=dataset.long), ConversationReply
        )
        assert isinstance(reply, ConversationReply)
        assert reply.conversation.event_count == len(events)
        assert reply.conversation.accumulated_cost == pytest.approx(0.12)
        after = await kv.get(dataset.long)
        assert after.revision == before.revision  # nothing newer to write, so nothing written
    finally:
        await clickhouse.select(Statement("SYSTEM START MERGES events", {}))


async def test_events_redelivered_after_a_crash_are_folded_in_log_order(
    queries: QueryClient,
    module_js: JetStreamContext,
    start_ingester: IngesterFactory,
    wait_until: WaitUntil,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crashed instance fetched a conversation's first events and never acked them: JetStream
    hands the newer events to the next instance first and the older ones only after ack_wait."""
    monkeypatch.setattr(ingest, "_ACK_WAIT_SECONDS", 1.0)  # the successor's config keeps it
    consumer_name = unique("event_store_crash")
    user_id, cid = unique("dave"), unique("crash")
    partition = partition_of(cid)
    crashed = await module_js.pull_subscribe(
        subjects.partition_events(partition),
        durable=subjects.event_store_durable(partition, consumer_name),
        stream=subjects.EVENTS_STREAM,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=1.0
        ),
    )
    events = task_events(cid, user_id, "Crash test", "octo/app", 1, ConversationStatus.FINISHED)
    appender = EventAppender(module_js)
    await appender.append_all(events[:3])
    fetched: set[int] = set()
    while len(fetched) < 3:  # the partition's earlier events too: the crash took them all
        for msg in await crashed.fetch(1000, timeout=5):
            if subjects.conversation_id_of(msg.subject) == cid:
                fetched.add(decode_event(msg.data).id)
    assert fetched == {0, 1, 2}  # fetched, never acked
    await crashed.unsubscribe()
    await appender.append_all(events[3:])

    successor = await start_ingester(consumer_name)
    try:

        async def finished() -> bool:
            reply = await queries.ask(
                GetConversation(user_id=user_id, conversation_id=cid), ConversationReply
            )
            return (
                isinstance(reply, ConversationReply)
                and reply.conversation.last_event_id == len(events) - 1
            )

        await wait_until(finished, "the successor to project every event")
    finally:
        await successor.stop()
    reply = await queries.ask(
        GetConversation(user_id=user_id, conversation_id=cid), ConversationReply
    )
    assert isinstance(reply, ConversationReply)
    assert reply.conversation.event_count == len(events)
    assert reply.conversation.status is ConversationStatus.FINISHED
    page = await search(queries, user_id=user_id, conversation_id=cid, limit=100)
    assert ids_of(page) == list(range(len(events)))
