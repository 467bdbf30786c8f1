"""A page of a conversation's events, read over as few ids as can hold it.

`FINAL` merges every granule the query's id range touches, so a page read over the whole
conversation costs what the conversation holds (5.7x for the newest 100 of 100,000 events
against a 100-event conversation). Event ids of a conversation are dense, so a page without
filters lies in the `limit + 1` ids from where it starts; a page read over those ids costs what
the page holds.

Each window is where the page starts (`start_id` forward, `end_id` or the conversation's end
newest first) up to some width: a prefix, in the page's order, of the ids the query asks. The
first `limit + 1` matching rows of a prefix are those of the whole range (duplicate rows share
their id, so FINAL folds them within any window), hence a window that yields `limit + 1` rows
is the answer, cursor and "one row more" included. One that yields fewer (filters, gaps, the
end) is widened `GROWTH` times over until it would reach the conversation's end, and then the
query's own range is read, exactly as without windows: no answer depends on the hint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from taskbus.contracts.queries import SearchEvents
from taskbus.event_store import sql
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.sql import IdWindow

# Each short window's successor is this many times wider: a filter matching 1 event in 1,000
# costs at most ~5 queries for a page of 20 in 100,000 events.
GROWTH = 8


def id_windows(query: SearchEvents, last_id: int | None) -> Iterator[IdWindow]:
    """The windows to try in turn, the query's whole range last. `last_id` is the
    conversation's last event id as far as the caller knows (the store holds at least up to
    it; later events may have come since); None or negative: unknown, read the whole range."""
    whole = IdWindow(query.start_id, query.end_id)
    if last_id is not None and last_id >= 0:
        width = query.limit + 1
        if query.reverse:
            top = last_id if query.end_id is None else min(query.end_id, last_id)
            while (low := top - width + 1) > query.start_id:
                yield IdWindow(low, query.end_id)
                width *= GROWTH
        else:
            end = last_id if query.end_id is None else min(query.end_id, last_id)
            while (high := query.start_id + width - 1) < end:
                yield IdWindow(query.start_id, high)
                width *= GROWTH
    yield whole


async def search_events(
    clickhouse: ClickHouse, query: SearchEvents, last_id: int | None
) -> Sequence[Sequence[Any]]:
    """(id, payload) rows of the page in its order, plus one more when there are more."""
    rows: Sequence[Sequence[Any]] = []
    for window in id_windows(query, last_id):
        rows = await clickhouse.select(sql.search_events(query, window))
        if len(rows) > query.limit:
            break
    return rows
