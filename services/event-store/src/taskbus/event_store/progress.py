"""How far the ingest has come, for queries that wait for it (see `consistency`)."""

from __future__ import annotations

import asyncio
import contextlib


class IngestProgress:
    """`handled_through`: every log message up to this stream sequence has been through a
    batch (stored, refused, or held back for a gap in its conversation). The consumer delivers
    new messages in stream order and batches are ingested one after another, so the highest
    sequence of a finished batch is such a bound."""

    def __init__(self) -> None:
        self.handled_through = 0
        self._moved = asyncio.Event()

    def advance(self, sequence: int) -> None:
        """A batch is done: wake everyone waiting for progress."""
        self.handled_through = max(self.handled_through, sequence)
        self._moved.set()
        self._moved = asyncio.Event()

    async def moved(self, wait_seconds: float) -> bool:
        """Wait for the next batch; False if none finished within `wait_seconds`."""
        moved = self._moved
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                await moved.wait()
        return moved.is_set()
