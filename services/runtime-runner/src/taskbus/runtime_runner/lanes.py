"""Ordered work per key, concurrency across keys: one conversation's actions run in order while
other conversations proceed."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

from taskbus.contracts.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class Lanes:
    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[Job]] = {}
        self._workers: set[asyncio.Task[None]] = set()

    def submit(self, key: Hashable, job: Job) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            worker = asyncio.create_task(self._drain(key, queue))
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        queue.append(job)

    async def _drain(self, key: Hashable, queue: deque[Job]) -> None:
        while queue:
            job = queue.popleft()
            try:
                await job()
            except Exception:
                logger.exception("job of lane %s failed", key)
        del self._queues[key]

    async def cancel(self) -> None:
        """Abandon queued and running jobs (their messages are redelivered later)."""
        await cancel_and_wait(*self._workers)
        self._queues.clear()
