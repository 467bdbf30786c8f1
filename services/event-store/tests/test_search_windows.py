"""A search page read over a window of ids (event_store.search) is the page read over the whole
range, on real ClickHouse: filters that leave windows short, reverse pages, ranges past the
end, a hint that is stale either way, a gap in the ids, and redelivered duplicates."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from taskbus.contracts.events import Event, decode_event, encode_event
from taskbus.contracts.queries import SearchEvents
from taskbus.event_store import search, sql
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.rows import event_row
from taskbus.event_store.sql import IdWindow
from taskbus.event_store.synthetic import conversation_history

USER = "windows-user"
CID = "windows-conversation"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
COUNT = 400
GAP = 250  # an id the store never got (its message was undecodable, say)
LAST_ID = COUNT - 1


def _history() -> list[Event]:
    events = conversation_history(random.Random(CID), CID, USER, T0, steps=COUNT)
    return [msgspec.structs.replace(e, id=i) for i, e in enumerate(events[:COUNT]) if i != GAP]


EVENTS = _history()


@pytest.fixture(scope="module")
async def stored(clickhouse: ClickHouse) -> ClickHouse:
    """The conversation in batches of 50, then two batches redelivered cut another way."""
    rows = [event_row(data, decode_event(data), USER, T0, T0) for data in map(encode_event, EVENTS)]
    for start in range(0, len(rows), 50):
        await clickhouse.insert_events(rows[start : start + 50])
    later = T0 + timedelta(minutes=1)
    for start, end in ((30, 110), (320, len(rows))):
        await clickhouse.insert_events([r._replace(ingested_at=later) for r in rows[start:end]])
    return clickhouse


Select = Callable[[sql.Statement], Awaitable[Sequence[Sequence[Any]]]]


def _windows_read(monkeypatch: pytest.MonkeyPatch, clickhouse: ClickHouse) -> list[IdWindow]:
    """Records the window of each search statement the store runs (it still runs them)."""
    seen: list[IdWindow] = []
    real: Select = clickhouse.select

    async def select(statement: sql.Statement) -> Sequence[Sequence[Any]]:
        seen.append(IdWindow(statement.parameters["low"], statement.parameters.get("high")))
        return await real(statement)

    monkeypatch.setattr(clickhouse, "select", select)
    return seen


async def _whole(clickhouse: ClickHouse, query: SearchEvents) -> list[int]:
    statement = sql.search_events(query, IdWindow(query.start_id, query.end_id))
    return [row[0] for row in await clickhouse.select(statement)]


QUERIES = [
    {},
    {"reverse": True},
    {"start_id": 240, "limit": 15},  # the page spans the gap
    {"start_id": 240, "limit": 15, "reverse": True, "end_id": 260},
    {"start_id": 100, "reverse": True, "limit": 5},  # the whole range is below the last id
    {"kinds": ["ThinkAction"], "limit": 3},
    {"kinds": ["ThinkAction"], "limit": 3, "reverse": True},
    {"kinds": ["MessageAction"], "reverse": True},  # only id 1 or so: every window is short
    {"kinds": ["Nothing"], "reverse": True},
    {"exclude_kinds": ["LLMMetrics", "CmdOutputChunk"], "source": "environment", "limit": 4},
    {"until": T0 + timedelta(minutes=3), "reverse": True, "limit": 4},
    {"query": "pytest", "limit": 2, "reverse": True},
    {"start_id": 5000},  # past the end
    {"end_id": 5000, "reverse": True, "limit": 3},
    {"end_id": 5000, "start_id": 390, "reverse": True},
    {"limit": 500},
]


@pytest.mark.parametrize("fields", QUERIES)
@pytest.mark.parametrize("last_id", [LAST_ID, 30, LAST_ID + 1000, None])
async def test_a_windowed_page_is_the_page_of_the_whole_range(
    stored: ClickHouse, fields: dict[str, Any], last_id: int | None
) -> None:
    """Whatever the hint (right, stale low as if events came since, too high, unknown)."""
    query = SearchEvents(user_id=USER, conversation_id=CID, **fields)
    found = [row[0] for row in await search.search_events(stored, query, last_id)]
    assert found == await _whole(stored, query)
    assert len(found) == len(set(found))


@pytest.mark.parametrize("reverse", [False, True])
async def test_pages_of_every_id_read_one_window_each_and_skip_the_gap(
    stored: ClickHouse, monkeypatch: pytest.MonkeyPatch, reverse: bool
) -> None:
    seen = _windows_read(monkeypatch, stored)
    query = SearchEvents(user_id=USER, conversation_id=CID, limit=20, reverse=reverse)
    found = [row[0] for row in await search.search_events(stored, query, LAST_ID)]
    expected = [e.id for e in EVENTS][::-1] if reverse else [e.id for e in EVENTS]
    assert found == expected[:21]  # deduplicated, in order, one row more
    assert seen == [IdWindow(LAST_ID - 20, None) if reverse else IdWindow(0, 20)]


async def test_a_short_window_widens_until_the_page_is_full(
    stored: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest 3 ThinkActions lie further back than 4 ids: the first window is short."""
    seen = _windows_read(monkeypatch, stored)
    query = SearchEvents(
        user_id=USER, conversation_id=CID, kinds=["ThinkAction"], limit=3, reverse=True
    )
    found = [row[0] for row in await search.search_events(stored, query, LAST_ID)]
    thinks = [e.id for e in EVENTS if e.kind == "ThinkAction"][::-1]
    assert found == thinks[:4]
    assert len(seen) >= 2 and seen[0] == IdWindow(LAST_ID - 3, None)
    assert [w.low for w in seen] == sorted((w.low for w in seen), reverse=True)


def test_windows_are_prefixes_of_the_range_in_page_order_and_end_with_it() -> None:
    forward = SearchEvents(user_id="u", conversation_id="c", start_id=10, limit=9)
    assert list(search.id_windows(forward, 10_000)) == [
        IdWindow(10, 19),
        IdWindow(10, 89),
        IdWindow(10, 649),
        IdWindow(10, 5129),
        IdWindow(10, None),
    ]
    reverse = SearchEvents(user_id="u", conversation_id="c", end_id=5000, reverse=True, limit=9)
    assert list(search.id_windows(reverse, 10_000)) == [
        IdWindow(4991, 5000),
        IdWindow(4921, 5000),
        IdWindow(4361, 5000),
        IdWindow(0, 5000),
    ]
    # Newest first without end_id: open above, so events that came since are read too.
    latest = SearchEvents(user_id="u", conversation_id="c", reverse=True, limit=9)
    assert next(search.id_windows(latest, 99)) == IdWindow(90, None)


@pytest.mark.parametrize(
    ("fields", "last_id"),
    [
        ({}, None),  # unknown end
        ({}, -1),
        ({"limit": 100}, 99),  # a conversation within one page
        ({"start_id": 500}, 99),  # past the end
        ({"start_id": 50, "end_id": 60}, 10_000),  # a range within one page
        ({"reverse": True, "start_id": 95}, 99),
        ({"reverse": True, "end_id": 10}, 10_000),
    ],
)
def test_a_range_no_window_can_narrow_is_read_whole_at_once(
    fields: dict[str, Any], last_id: int | None
) -> None:
    query = SearchEvents(user_id="u", conversation_id="c", **fields)
    assert list(search.id_windows(query, last_id)) == [IdWindow(query.start_id, query.end_id)]
