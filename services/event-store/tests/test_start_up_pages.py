"""The event-store hands back the pages of chDB's library that only opening it read."""

from __future__ import annotations

import re

import pytest

from taskbus.event_store.clickhouse import ClickHouse, release_start_up_pages
from taskbus.event_store.sql import Statement

pytestmark = pytest.mark.parametrize("clickhouse", ["chdb"], indirect=True)

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def library_kb(field: str) -> int:
    """`field` of /proc/self/smaps (kB) summed over the chDB library's mappings."""
    total, in_library = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if _MAPPING.match(line):
                in_library = "/chdb/_chdb" in line
            elif in_library and line.startswith(f"{field}:"):
                total += int(line.split()[1])
    return total


async def test_the_library_pages_are_released_and_faulted_back_as_needed(
    clickhouse: ClickHouse,
) -> None:
    resident_before = library_kb("Rss")
    # Pages only this process maps (a parallel test worker maps the same file: those are
    # shared, and stay).
    own_before = library_kb("Private_Clean")
    assert release_start_up_pages() > 100 * 2**20  # the library is about 550 MB
    assert library_kb("Private_Clean") <= own_before // 10
    assert library_kb("Rss") <= resident_before
    # The engine faults back what it runs.
    assert await clickhouse.select(Statement("SELECT count() FROM system.one", {})) == [(1,)]
    await clickhouse.select(
        Statement("INSERT INTO schema_migrations SELECT * FROM schema_migrations LIMIT 1", {})
    )
