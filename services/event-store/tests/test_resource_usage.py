"""Resource usage in the event store: the latest sample in the projection (ClickHouse row and KV
status), the per-conversation analytics against figures worked out by hand, and the column's
migration on a store made before it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import ConversationCreated, Event, EventSource, ResourceUsage
from taskbus.contracts.queries import (
    ConversationPage,
    ConversationReply,
    ConversationResources,
    GetConversation,
    ListConversations,
    ResourceAnalytics,
    ResourceReport,
    ResourceUsageInfo,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.sql import Statement

from .conftest import WaitUntil

pytestmark = pytest.mark.usefixtures("event_store")

T0 = datetime(2025, 6, 1, tzinfo=UTC)
MB = 1 << 20


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def created(cid: str, user: str) -> ConversationCreated:
    return ConversationCreated(
        conversation_id=cid,
        source=EventSource.USER,
        timestamp=T0,
        user_id=user,
        title="usage",
        spec=ConversationSpec(),
    )


def sample(
    cid: str, second: float, cpu: float, memory: int, peak: int, pids: int = 2, disk: int = 0
) -> ResourceUsage:
    return ResourceUsage(
        conversation_id=cid,
        source=EventSource.ENVIRONMENT,
        timestamp=at(second),
        cpu_seconds=cpu,
        memory_bytes=memory,
        memory_peak_bytes=peak,
        pids=pids,
        disk_bytes=disk,
        measured_by="cgroup",
    )


class Dataset(msgspec.Struct):
    user: str
    other_user: str
    busy: str  # two sandboxes one after the other
    quiet: str
    never_measured: str
    others: str
    logs: dict[str, list[Event]]


@pytest.fixture(scope="module")
async def dataset(
    module_js: JetStreamContext, event_store: Ingester, wait_until: WaitUntil
) -> Dataset:
    tag = uuid.uuid4().hex[:8]
    user, other_user = f"usage-a-{tag}", f"usage-b-{tag}"
    busy, quiet, never, others = (f"{name}{tag}" for name in ("busy", "quiet", "never", "other"))
    plans: dict[str, list[Event]] = {
        busy: [
            created(busy, user),
            sample(busy, 5, 1.0, 10 * MB, 10 * MB, disk=4096),
            sample(busy, 10, 2.0, 250 * MB, 250 * MB, pids=9, disk=8192),
            sample(busy, 15, 3.5, 20 * MB, 260 * MB, disk=8192),
            # A new sandbox: its CPU time counts from 0 again, its peak too.
            sample(busy, 100, 0.5, 30 * MB, 30 * MB, disk=12288),
            sample(busy, 105, 2.0, 40 * MB, 40 * MB, disk=12288),
        ],
        quiet: [created(quiet, user), sample(quiet, 7, 0.25, 5 * MB, 6 * MB)],
        never: [created(never, user)],
        others: [created(others, other_user), sample(others, 5, 9.0, 900 * MB, 900 * MB)],
    }
    appender = EventAppender(module_js)
    logs = {cid: await appender.append_all(events) for cid, events in plans.items()}
    await wait_until(event_store.caught_up, "the ingest to catch up")
    return Dataset(
        user=user,
        other_user=other_user,
        busy=busy,
        quiet=quiet,
        never_measured=never,
        others=others,
        logs=logs,
    )


def latest_usage(log: list[Event]) -> ResourceUsageInfo:
    last = [e for e in log if isinstance(e, ResourceUsage)][-1]
    return ResourceUsageInfo(
        cpu_seconds=last.cpu_seconds,
        memory_bytes=last.memory_bytes,
        memory_peak_bytes=last.memory_peak_bytes,
        pids=last.pids,
        disk_bytes=last.disk_bytes,
        measured_by=last.measured_by,
        measured_at=last.timestamp,
        event_id=last.id,
    )


async def test_the_latest_usage_is_in_the_conversation_row_and_kv(
    queries: QueryClient, module_js: JetStreamContext, dataset: Dataset
) -> None:
    kv = await module_js.key_value(subjects.CONVERSATIONS_BUCKET)
    for cid, expected in (
        (dataset.busy, latest_usage(dataset.logs[dataset.busy])),
        (dataset.quiet, latest_usage(dataset.logs[dataset.quiet])),
        (dataset.never_measured, None),
    ):
        reply = await queries.ask(
            GetConversation(user_id=dataset.user, conversation_id=cid), ConversationReply
        )
        assert isinstance(reply, ConversationReply), reply
        assert reply.conversation.resource_usage == expected
        entry = await kv.get(cid)
        assert entry.value is not None
        projected = msgspec.json.decode(entry.value)
        assert projected.get("resource_usage") == (
            None if expected is None else msgspec.to_builtins(expected)
        )
    page = await queries.ask(ListConversations(user_id=dataset.user), ConversationPage)
    assert isinstance(page, ConversationPage)
    by_id = {info.conversation_id: info.resource_usage for info in page.conversations}
    assert by_id[dataset.busy] == latest_usage(dataset.logs[dataset.busy])
    assert by_id[dataset.never_measured] is None


async def test_resources_per_conversation(queries: QueryClient, dataset: Dataset) -> None:
    reply = await queries.ask(ResourceAnalytics(user_id=dataset.user), ResourceReport)
    assert isinstance(reply, ResourceReport), reply
    assert reply.conversations == [
        ConversationResources(
            conversation_id=dataset.busy,
            samples=5,
            cpu_seconds=pytest.approx(3.5 + 2.0),  # both sandboxes' time
            memory_peak_bytes=260 * MB,
            max_pids=9,
            max_disk_bytes=12288,
            last_measured_at=at(105),
        ),
        ConversationResources(
            conversation_id=dataset.quiet,
            samples=1,
            cpu_seconds=0.25,
            memory_peak_bytes=6 * MB,
            max_pids=2,
            max_disk_bytes=0,
            last_measured_at=at(7),
        ),
    ]
    top = await queries.ask(ResourceAnalytics(user_id=dataset.user, limit=1), ResourceReport)
    assert isinstance(top, ResourceReport)
    assert [c.conversation_id for c in top.conversations] == [dataset.busy]


async def test_resources_in_a_window(queries: QueryClient, dataset: Dataset) -> None:
    query = ResourceAnalytics(user_id=dataset.user, since=at(50), until=at(105))
    reply = await queries.ask(query, ResourceReport)
    assert isinstance(reply, ResourceReport), reply
    (busy,) = reply.conversations
    assert (busy.conversation_id, busy.samples, busy.memory_peak_bytes) == (
        dataset.busy,
        1,
        30 * MB,
    )
    assert busy.cpu_seconds == pytest.approx(0.5)


async def test_resources_are_the_users_own(queries: QueryClient, dataset: Dataset) -> None:
    other = await queries.ask(ResourceAnalytics(user_id=dataset.other_user), ResourceReport)
    assert isinstance(other, ResourceReport)
    assert [c.conversation_id for c in other.conversations] == [dataset.others]
    stranger = await queries.ask(ResourceAnalytics(user_id="nobody"), ResourceReport)
    assert stranger == ResourceReport(conversations=[])
    for limit in (0, 101):
        body = msgspec.json.encode({"user_id": dataset.user, "limit": limit})
        refused = await queries.ask_raw("analytics_resources", body, ResourceReport)
        assert not isinstance(refused, ResourceReport)
        assert refused.status == 422 and "limit" in refused.detail


async def test_the_column_is_added_to_a_store_made_before_it(
    queries: QueryClient, clickhouse: ClickHouse, dataset: Dataset
) -> None:
    """Migration 5 on a conversations table without the column: rows read as never measured
    until the next sample; running it again changes nothing."""
    for statement in (
        "ALTER TABLE conversations DROP COLUMN resource_usage",
        "ALTER TABLE schema_migrations DELETE WHERE version = 5 SETTINGS mutations_sync = 2",
    ):
        await clickhouse.select(Statement(statement, {}))
    assert await clickhouse.migrate() == [5]
    assert await clickhouse.migrate() == []
    page = await queries.ask(ListConversations(user_id=dataset.user), ConversationPage)
    assert isinstance(page, ConversationPage)
    assert {info.conversation_id for info in page.conversations} >= {dataset.busy, dataset.quiet}
    assert all(info.resource_usage is None for info in page.conversations)
