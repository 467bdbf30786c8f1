"""Stopping background tasks for sure.

On Python 3.11 `asyncio.wait_for` (under every nats-py request) can swallow a cancellation that
arrives just as the awaited reply does (CPython gh-86296, fixed in 3.12). A loop cancelled at
that moment simply goes on, and a stop that cancels once, then awaits, waits forever: under
load this hung a session-manager's stop in its health heartbeat. `cancel_and_wait` cancels
again until each task has really ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

CANCEL_AGAIN_SECONDS = 0.5


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks` and return once each has ended; their exceptions are dropped (a stopping
    task's last error is no longer anyone's business)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_SECONDS)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: not reported as "never retrieved"
