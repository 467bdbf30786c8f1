"""A search page read over a window of ids (event_store.search) is the page read over the whole
range, on real ClickHouse: filters, reverse pages, ranges past the end, a hint that is stale
either way, a gap in the ids, and redelivered duplicates."""

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


def _reads(monkeypatch: pytest.MonkeyPatch, clickhouse: ClickHouse) -> list[IdWindow]:
    """Records the window each search statement the store runs reads (it still runs them)."""
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


async def _ids(clickhouse: ClickHouse, query: SearchEvents, last_id: int | None) -> list[int]:
    return [row[0] for row in await search.search_events(clickhouse, query, last_id)]


QUERIES = [
    {},
    {"reverse": True},
    {"start_id": 240, "limit": 15},  # the page spans the gap
    {"start_id": 240, "limit": 15, "reverse": True, "end_id": 260},
    {"start_id": 100, "reverse": True, "limit": 5},  # the whole range is below the last id
    {"kinds": ["ThinkAction"], "limit": 3},
    {"kinds": ["ThinkAction"], "limit": 3, "reverse": True, "end_id": 300},
    {"kinds": ["MessageAction"], "reverse": True},  # fewer matches than a page
    {"kinds": ["Nothing"], "reverse": True},
    {"exclude_kinds": ["LLMMetrics", "CmdOutputChunk"], "source": "environment", "limit": 4},
    {"until": T0 + timedelta(minutes=3), "reverse": True, "limit": 4},
    {"query": "pytest", "limit": 2, "reverse": True, "start_id": 200},
    {"start_id": 5000},  # past the end
    {"start_id": 5000, "kinds": ["ThinkAction"]},
    {"end_id": 5000, "reverse": True, "limit": 3},
    {"end_id": 5000, "start_id": 390, "reverse": True},
    {"limit": 500},
]


@pytest.mark.parametrize("fields", QUERIES)
@pytest.mark.parametrize("last_id", [LAST_ID, 30, LAST_ID + 1000, None])
async def test_a_windowed_page_is_the_page_of_the_whole_range(
    stored: ClickHouse, fields: dict[str, Any], last_id: int | None
) -> None:
    """Whatever the hint: right, stale low (as if events came since), too high, unknown."""
    query = SearchEvents(user_id=USER, conversation_id=CID, **fields)
    found = await _ids(stored, query, last_id)
    assert found == await _whole(stored, query)
    assert len(found) == len(set(found))


@pytest.mark.parametrize("reverse", [False, True])
async def test_pages_of_every_id_read_one_window_each_and_skip_the_gap(
    stored: ClickHouse, monkeypatch: pytest.MonkeyPatch, reverse: bool
) -> None:
    seen = _reads(monkeypatch, stored)
    query = SearchEvents(user_id=USER, conversation_id=CID, limit=20, reverse=reverse)
    expected = [e.id for e in EVENTS][::-1] if reverse else [e.id for e in EVENTS]
    assert await _ids(stored, query, LAST_ID) == expected[:21]  # deduplicated, one row more
    assert seen == [IdWindow(LAST_ID - 20, None) if reverse else IdWindow(0, 20)]
    seen.clear()
    across_the_gap = SearchEvents(user_id=USER, conversation_id=CID, limit=20, start_id=GAP - 5)
    expected = [*range(GAP - 5, GAP), *range(GAP + 1, GAP + 17)]
    assert await _ids(stored, across_the_gap, LAST_ID) == expected
    assert seen == [IdWindow(GAP - 5, GAP + 15), IdWindow(GAP - 5, None)]  # short: then whole


async def test_a_filtered_page_is_one_read_of_the_whole_range(
    stored: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _reads(monkeypatch, stored)
    thinks = [e.id for e in EVENTS if e.kind == "ThinkAction"][::-1]
    query = SearchEvents(
        user_id=USER, conversation_id=CID, kinds=["ThinkAction"], limit=3, reverse=True
    )
    assert await _ids(stored, query, LAST_ID) == thinks[:4]
    assert seen == [IdWindow(0, None)]


@pytest.mark.parametrize(
    ("fields", "end"),
    [
        ({"limit": 9, "start_id": 10}, 10_000),
        ({"limit": 9, "reverse": True}, 10_000),
        ({"limit": 9, "reverse": True, "end_id": 5000}, 5000),
    ],
)
def test_a_page_window_is_the_limit_and_one_ids_from_where_the_page_starts(
    fields: dict[str, Any], end: int
) -> None:
    query = SearchEvents(user_id="u", conversation_id="c", **fields)
    window = search.page_window(query, end)
    assert window is not None
    low, high = window
    assert (high if high is not None else end) - low == 9
    if query.reverse:
        assert high == query.end_id
    else:
        assert low == query.start_id


@pytest.mark.parametrize(
    ("fields", "end"),
    [
        ({"limit": 100}, 99),  # a conversation within one page
        ({"start_id": 500}, 99),  # past the end
        ({"start_id": 50, "end_id": 60}, 60),  # a range within one page
        ({"reverse": True, "start_id": 95}, 99),
        ({"reverse": True, "end_id": 10}, 10),
    ],
)
def test_a_range_no_window_can_narrow_is_read_whole(fields: dict[str, Any], end: int) -> None:
    assert search.page_window(SearchEvents(user_id="u", conversation_id="c", **fields), end) is None
