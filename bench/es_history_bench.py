"""Search of a long conversation against a short one, on the event-store's own SQL and chDB.

    uv run python bench/es_history_bench.py [--events 100000] [--runs 15]

The event-store query of each conversation's last page (100 events, newest first, the
SearchEvents a client's "latest events" asks) and of its first page, with the SQL the
responder runs (`search.search_events`, given the conversation's last id as the read barrier
gives it), on real embedded chDB holding both conversations. (The reload half of the
history target is session-manager's: bench/history_bench.py.)
Target (issue 13): the N-event figures within 1.2x of the 100-event ones.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import tempfile
from datetime import UTC, datetime

import msgspec

from taskbus.contracts.events import Event, decode_event, encode_event
from taskbus.contracts.queries import SearchEvents
from taskbus.devtools.bench_report import interleaved_median_seconds, print_table
from taskbus.event_store import search
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.rows import event_row
from taskbus.event_store.synthetic import conversation_history

SMALL = 100
TARGET = 1.2
USER = "bench"


def history(cid: str, count: int) -> list[Event]:
    """`count` events of a working agent's conversation, ids 0..count-1."""
    events = conversation_history(
        random.Random(cid), cid, USER, datetime(2025, 1, 1, tzinfo=UTC), steps=count // 2
    )
    assert len(events) >= count, len(events)
    return [msgspec.structs.replace(e, id=i) for i, e in enumerate(events[:count])]


async def main(total: int, runs: int) -> None:
    big, small = history("bench-big", total), history("bench-small", SMALL)
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        clickhouse = await ClickHouse.connect(f"chdb://{tmp}/ch", query_connections=1)
        await clickhouse.migrate()
        now = datetime.now(UTC)
        print(f"storing {total:,} + {SMALL} events ...", flush=True)
        for events in (small, big):
            for start in range(0, len(events), 10_000):
                stored = [encode_event(e) for e in events[start : start + 10_000]]
                await clickhouse.insert_events(
                    [event_row(data, decode_event(data), USER, now, now) for data in stored]
                )

        async def page(events: list[Event], reverse: bool) -> None:
            query = SearchEvents(
                user_id=USER, conversation_id=events[0].conversation_id, reverse=reverse,
                limit=100,
            )  # fmt: skip
            found = await search.search_events(clickhouse, query, events[-1].id)
            assert len(found) >= 100, len(found)

        for name, reverse in (("last page of 100", True), ("first page of 100", False)):
            small_time, big_time = await interleaved_median_seconds(
                runs, *(functools.partial(page, events, reverse) for events in (small, big))
            )
            rows.append((f"search: {name} (chDB)", f"{small_time * 1e3:.2f} ms",
                         f"{big_time * 1e3:.2f} ms", f"{big_time / small_time:.2f}x"))  # fmt: skip
        await clickhouse.close()

    header = ("", f"{SMALL} events", f"{total:,} events", f"ratio (target ≤ {TARGET}x)")
    print_table(header, rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=15)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.events, arguments.runs))
