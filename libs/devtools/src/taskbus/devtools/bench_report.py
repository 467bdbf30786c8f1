"""What every script in bench/ shares: timing an action the same way, and printing its figures
beside their same-run references as one aligned table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence


async def median_seconds(runs: int, action: Callable[[], Awaitable[object]]) -> float:
    """Median seconds of `runs` calls, after one warm-up (the first call pays for caches)."""
    return (await interleaved_median_seconds(runs, action))[0]


async def interleaved_median_seconds(
    runs: int, *actions: Callable[[], Awaitable[object]]
) -> list[float]:
    """Median seconds of each action over `runs` rounds that call them in turn (after one
    warm-up round): a figure and its same-run reference see the same swings of a shared
    machine's load, where one block of runs after the other may not."""
    times: list[list[float]] = [[] for _ in actions]
    for round_ in range(runs + 1):
        for action, measured in zip(actions, times, strict=True):
            started = time.perf_counter()
            await action()
            if round_:
                measured.append(time.perf_counter() - started)
    return [statistics.median(measured) for measured in times]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """`rows` under `header`, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "-+-".join("-" * width for width in widths)
    print(line)
    for row in [header, *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(line)
