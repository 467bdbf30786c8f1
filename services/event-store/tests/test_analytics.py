"""Analytics over a generated multi-user history, ingested from real JetStream into ClickHouse,
each figure checked against an independent computation in Python over the appended events."""

from __future__ import annotations

import statistics
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from taskbus.contracts.events import (
    CmdOutputObservation,
    CommandTimeout,
    ConversationCreated,
    ConversationStatusChanged,
    Event,
    LLMMetrics,
)
from taskbus.contracts.queries import (
    CostAnalytics,
    CostBucket,
    CostGroupBy,
    CostReport,
    DurationAnalytics,
    DurationReport,
    EventKindCounts,
    EventKindReport,
    FailingCommand,
    FailingCommands,
    FailingCommandsReport,
    KindCount,
    OutcomeStats,
)
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store.query_client import QueryClient

pytestmark = pytest.mark.usefixtures("event_store")

IngestHistory = Callable[..., Awaitable[list[list[Event]]]]
T0 = datetime(2025, 3, 1, tzinfo=UTC)
ENDED = {ConversationStatus.FINISHED, ConversationStatus.ERROR, ConversationStatus.STOPPED}


class History(msgspec.Struct):
    users: list[str]
    by_user: dict[str, list[list[Event]]]  # user -> conversations -> events as appended


@pytest.fixture(scope="module")
async def history(ingest_history: IngestHistory) -> History:
    tag = uuid.uuid4().hex[:6]
    users = [f"u{n}{tag}" for n in range(3)]
    appended = await ingest_history(5, users, 6, T0, max_steps=14, id_prefix=f"an{tag}")
    by_user: dict[str, list[list[Event]]] = defaultdict(list)
    for events in appended:
        assert isinstance(events[0], ConversationCreated)
        by_user[events[0].user_id].append(events)
    return History(users=users, by_user=dict(by_user))


def in_window(event: Event, since: datetime | None, until: datetime | None) -> bool:
    return (since is None or event.timestamp >= since) and (
        until is None or event.timestamp < until
    )


def events_of(history: History, user: str) -> list[Event]:
    return [event for events in history.by_user[user] for event in events]


# --- independent computations --------------------------------------------------------------------


def expected_costs(
    user: str,
    events: Sequence[Event],
    group_by: CostGroupBy,
    since: datetime | None,
    until: datetime | None,
) -> list[CostBucket]:
    """`events` are all `user`'s."""
    key_of: dict[CostGroupBy, Callable[[LLMMetrics], str]] = {
        CostGroupBy.USER: lambda e: user,
        CostGroupBy.DAY: lambda e: e.timestamp.date().isoformat(),
        CostGroupBy.MODEL: lambda e: e.model,
        CostGroupBy.CONVERSATION: lambda e: e.conversation_id,
    }
    groups: dict[str, list[LLMMetrics]] = defaultdict(list)
    for event in events:
        if isinstance(event, LLMMetrics) and in_window(event, since, until):
            groups[key_of[group_by](event)].append(event)
    return [
        CostBucket(
            key=key,
            cost=sum(e.cost for e in calls),
            llm_calls=len(calls),
            prompt_tokens=sum(e.prompt_tokens for e in calls),
            completion_tokens=sum(e.completion_tokens for e in calls),
            conversations=len({e.conversation_id for e in calls}),
        )
        for key, calls in sorted(groups.items())
    ]


def quantile(values: Sequence[float], level: float) -> float:
    """Linear interpolation between closest ranks (`statistics.quantiles`, inclusive)."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return cuts[4] if level == 0.5 else cuts[8]


def expected_outcomes(
    conversations: Sequence[Sequence[Event]], since: datetime | None, until: datetime | None
) -> list[OutcomeStats]:
    durations: dict[ConversationStatus, list[float]] = defaultdict(list)
    for events in conversations:
        created = events[0]
        if not in_window(created, since, until):
            continue
        changes = [
            e
            for e in events
            if isinstance(e, ConversationStatusChanged)
            and e.status is not ConversationStatus.ARCHIVED
        ]
        outcome = changes[-1].status if changes else ConversationStatus.QUEUED
        seconds = (changes[-1].timestamp - created.timestamp).total_seconds() if changes else 0
        durations[outcome].append(seconds)
    rows = []
    for status in sorted(durations, key=lambda s: s.value):
        values = durations[status]
        ended = status in ENDED
        rows.append(
            OutcomeStats(
                status=status,
                conversations=len(values),
                mean_seconds=statistics.fmean(values) if ended else None,
                p50_seconds=quantile(values, 0.5) if ended else None,
                p90_seconds=quantile(values, 0.9) if ended else None,
                max_seconds=max(values) if ended else None,
            )
        )
    return rows


def expected_kinds(events: Sequence[Event]) -> list[KindCount]:
    counts = Counter(e.kind for e in events)
    conversations: dict[str, set[str]] = defaultdict(set)
    for e in events:
        conversations[e.kind].add(e.conversation_id)
    return [
        KindCount(kind=kind, events=n, conversations=len(conversations[kind]))
        for kind, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]


def expected_failing(events: Sequence[Event], limit: int) -> list[FailingCommand]:
    runs: dict[str, list[CmdOutputObservation]] = defaultdict(list)
    for e in events:
        if isinstance(e, CmdOutputObservation) and e.timed_out is not CommandTimeout.SOFT:
            runs[e.command].append(e)
    rows = []
    for command, observed in runs.items():
        failed = [e for e in observed if e.exit_code != 0]
        if not failed:
            continue
        last = max(failed, key=lambda e: (e.timestamp, e.conversation_id, e.id))
        rows.append(
            FailingCommand(
                command=command,
                failures=len(failed),
                runs=len(observed),
                conversations=len({e.conversation_id for e in failed}),
                last_failed_at=last.timestamp,
                last_exit_code=last.exit_code,
            )
        )
    rows.sort(key=lambda row: (-row.failures, row.command))
    return rows[:limit]


# --- the tests -----------------------------------------------------------------------------------


def assert_costs_equal(actual: list[CostBucket], expected: list[CostBucket]) -> None:
    assert [b.key for b in actual] == [b.key for b in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.cost == pytest.approx(want.cost, rel=1e-9)
        assert msgspec.structs.replace(got, cost=0.0) == msgspec.structs.replace(want, cost=0.0)


@pytest.mark.parametrize("group_by", list(CostGroupBy))
async def test_cost_per_group_matches_the_llm_metrics(
    queries: QueryClient, history: History, group_by: CostGroupBy
) -> None:
    for user in history.users:
        reply = await queries.ask(CostAnalytics(user_id=user, group_by=group_by), CostReport)
        assert isinstance(reply, CostReport), reply
        assert reply.group_by is group_by
        expected = expected_costs(user, events_of(history, user), group_by, None, None)
        assert expected, "the generated history has LLM calls"
        assert_costs_equal(reply.buckets, expected)


async def test_cost_in_a_time_window(queries: QueryClient, history: History) -> None:
    user = history.users[0]
    since, until = T0 + timedelta(days=1), T0 + timedelta(days=2, hours=7)
    reply = await queries.ask(
        CostAnalytics(user_id=user, group_by=CostGroupBy.DAY, since=since, until=until), CostReport
    )
    assert isinstance(reply, CostReport)
    expected = expected_costs(user, events_of(history, user), CostGroupBy.DAY, since, until)
    everything = expected_costs(user, events_of(history, user), CostGroupBy.DAY, None, None)
    calls = sum(b.llm_calls for b in expected)
    assert 0 < calls < sum(b.llm_calls for b in everything), "the window cuts the history"
    assert_costs_equal(reply.buckets, expected)


@pytest.mark.parametrize("window", ["all", "window"])
async def test_durations_and_outcomes(queries: QueryClient, history: History, window: str) -> None:
    since, until = (
        (None, None) if window == "all" else (T0 + timedelta(hours=12), T0 + timedelta(days=2))
    )
    for user in history.users:
        reply = await queries.ask(
            DurationAnalytics(user_id=user, since=since, until=until), DurationReport
        )
        assert isinstance(reply, DurationReport), reply
        expected = expected_outcomes(history.by_user[user], since, until)
        assert [(o.status, o.conversations) for o in reply.outcomes] == [
            (o.status, o.conversations) for o in expected
        ]
        for got, want in zip(reply.outcomes, expected, strict=True):
            for field in ("mean_seconds", "p50_seconds", "p90_seconds", "max_seconds"):
                value, wanted = getattr(got, field), getattr(want, field)
                assert value == (None if wanted is None else pytest.approx(wanted, rel=1e-9))
    everything = await queries.ask(DurationAnalytics(user_id=history.users[0]), DurationReport)
    assert isinstance(everything, DurationReport)
    assert sum(o.conversations for o in everything.outcomes) == 6
    assert {o.status for o in everything.outcomes} & ENDED


async def test_event_counts_per_kind(queries: QueryClient, history: History) -> None:
    for user in history.users:
        reply = await queries.ask(EventKindCounts(user_id=user), EventKindReport)
        assert isinstance(reply, EventKindReport), reply
        assert reply.kinds == expected_kinds(events_of(history, user))
    one = history.by_user[history.users[1]][0]
    reply = await queries.ask(
        EventKindCounts(user_id=history.users[1], conversation_id=one[0].conversation_id),
        EventKindReport,
    )
    assert isinstance(reply, EventKindReport)
    assert reply.kinds == expected_kinds(one)


async def test_top_failing_commands(queries: QueryClient, history: History) -> None:
    for user in history.users:
        for limit in (3, 100):
            reply = await queries.ask(
                FailingCommands(user_id=user, limit=limit), FailingCommandsReport
            )
            assert isinstance(reply, FailingCommandsReport), reply
            assert reply.commands == expected_failing(events_of(history, user), limit)
    assert reply.commands, "the generated history has failing commands"


async def test_a_user_sees_only_their_own_figures(queries: QueryClient, history: History) -> None:
    stranger = "nobody-" + uuid.uuid4().hex[:6]
    other = history.by_user[history.users[0]][0][0].conversation_id
    cost = await queries.ask(CostAnalytics(user_id=stranger, group_by=CostGroupBy.USER), CostReport)
    kinds = await queries.ask(
        EventKindCounts(user_id=stranger, conversation_id=other), EventKindReport
    )
    durations = await queries.ask(DurationAnalytics(user_id=stranger), DurationReport)
    failing = await queries.ask(FailingCommands(user_id=stranger), FailingCommandsReport)
    assert cost == CostReport(group_by=CostGroupBy.USER, buckets=[])
    assert kinds == EventKindReport(kinds=[])
    assert durations == DurationReport(outcomes=[])
    assert failing == FailingCommandsReport(commands=[])
    per_user = await queries.ask(
        CostAnalytics(user_id=history.users[2], group_by=CostGroupBy.USER), CostReport
    )
    assert isinstance(per_user, CostReport)
    assert [b.key for b in per_user.buckets] == [history.users[2]]


async def test_failing_commands_limit_is_bounded(queries: QueryClient, history: History) -> None:
    for limit in (0, 101):
        body = msgspec.json.encode({"user_id": history.users[0], "limit": limit})
        reply = await queries.ask_raw("analytics_failing_commands", body, FailingCommandsReport)
        assert not isinstance(reply, FailingCommandsReport)
        assert reply.status == 422 and "limit" in reply.detail
