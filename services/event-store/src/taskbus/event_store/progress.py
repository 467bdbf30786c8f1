"""How far the ingest has come, for queries and purges that wait for it (see `consistency`).

The record of what is stored is the ingest durables' state on the server: a batch is acked
only once it is stored, so a partition's durable that has acked an event has stored it,
whichever instance held the partition. `IngestProgress` only wakes this process's waiters when
its own ingest finishes a batch, so they need not poll the server for what happens here; and
their waiting cuts short the pause the ingest takes between writes under load (`Ingester._write`).
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.js import JetStreamContext

from taskbus.contracts import subjects


async def has_acked(js: JetStreamContext, durable: str, sequence: int) -> bool:
    """Whether `durable` has acked every message of its filter up to stream `sequence`, one of
    its filter's messages: its ack floor is at or past it, or it has nothing pending and
    nothing unacked (a filtered consumer's floor stays at the last message it was given).
    Raises nats' NotFoundError when there is no such durable."""
    info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
    return bool((floor or 0) >= sequence or (info.num_pending == 0 and info.num_ack_pending == 0))


class IngestProgress:
    """Signals each batch this process's ingest finishes (stored, refused or held back), and
    tells the ingest when a reader is waiting for one, so it does not pause its writes then."""

    def __init__(self) -> None:
        self._moved = asyncio.Event()
        self._awaited = asyncio.Event()

    def advance(self) -> None:
        """A batch is done: wake everyone waiting for progress."""
        self._moved.set()
        self._moved = asyncio.Event()
        self._awaited.clear()  # a reader still waiting says so again (`moved`)

    async def moved(self, wait_seconds: float) -> bool:
        """Wait for the next batch; False if none finished within `wait_seconds`."""
        moved = self._moved
        self._awaited.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                await moved.wait()
        return moved.is_set()

    async def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`: less if a reader is, or starts, waiting for the next batch."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._awaited.wait()
