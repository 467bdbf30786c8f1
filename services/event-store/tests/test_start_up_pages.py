"""The event-store hands back the pages of chDB's library that only opening it read.

Run in a process of its own: the pages released are the whole test process' (every later chDB
call there would fault them back from disk, slowing tests that time chDB's answers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import asyncio, json, re, sys
from taskbus.event_store.clickhouse import ClickHouse, release_start_up_pages
from taskbus.event_store.sql import Statement

MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")

def library_kb(field):
    total, in_library = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if MAPPING.match(line):
                in_library = "/chdb/_chdb" in line
            elif in_library and line.startswith(field + ":"):
                total += int(line.split()[1])
    return total

async def main():
    store = await ClickHouse.connect("chdb://" + sys.argv[1], query_connections=1)
    await store.migrate()
    figures = {"rss_before": library_kb("Rss"), "own_before": library_kb("Private_Clean")}
    figures["advised"] = release_start_up_pages()
    figures["rss_after"] = library_kb("Rss")
    figures["own_after"] = library_kb("Private_Clean")
    copy = "INSERT INTO schema_migrations SELECT * FROM schema_migrations LIMIT 1"
    await store.select(Statement(copy, {}))
    figures["answer"] = await store.select(Statement("SELECT count() FROM system.one", {}))
    await store.close()
    print(json.dumps(figures))

asyncio.run(main())
"""


def test_the_library_pages_are_released_and_faulted_back_as_needed(tmp_path: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    assert figures["advised"] > 100 * 2**20  # the library is about 550 MB
    # Pages only this process maps go (another process mapping the same file keeps its share).
    assert figures["own_after"] <= figures["own_before"] // 10
    assert figures["rss_after"] <= figures["rss_before"]
    assert figures["answer"] == [[1]]  # the engine faults back what it runs, inserts included
