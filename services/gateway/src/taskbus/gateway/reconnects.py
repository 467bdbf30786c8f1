"""Reconnects of the gateway's NATS connection: a restarted nats-server has forgotten the
ephemeral consumers made before, so whoever owns one must make it again."""

from __future__ import annotations

import asyncio


class Reconnects:
    """Counts the connection's reconnects. Waiting for one past a count already seen (rather
    than for the next event) means a waiter busy during a reconnect still learns of it."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def notify(self) -> None:
        """nats-py's `reconnected_cb`: runs once the connection is usable again."""
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def after(self, seen: int) -> int:
        """Wait until the count passes `seen`; return the new count."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.count > seen)
            return self.count
