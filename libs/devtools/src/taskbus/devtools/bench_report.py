"""What every script in bench/ shares: timing an action the same way, and printing its figures
beside their same-run references as one aligned table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence


async def median_seconds(runs: int, action: Callable[[], Awaitable[object]]) -> float:
    """Median seconds of `runs` calls, after one warm-up (the first call pays for caches)."""
    await action()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """`rows` under `header`, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "-+-".join("-" * width for width in widths)
    print(line)
    for row in [header, *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(line)
