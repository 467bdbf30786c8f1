"""Users' settings on a real KV bucket, as two session-manager instances see them: each keeps
copies (read at every LLM step), a write by either reaches both at once through the watch, and
a copy the watch could not drop serves no longer than its limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer
from taskbus.session_manager import log
from taskbus.session_manager.log import SettingsStore

SEVEN = UserSettings(max_iterations=7)
NINE = UserSettings(max_iterations=9)


@pytest.fixture
async def instances(tmp_path: Path) -> AsyncIterator[list[JetStreamContext]]:
    """Two connections to one server, as two instances."""
    with NatsServer(tmp_path) as server:
        connections = [await nats.connect(server.url) for _ in range(2)]
        try:
            await ensure_streams(connections[0].jetstream())
            yield [nc.jetstream() for nc in connections]
        finally:
            for nc in connections:
                await nc.drain()


async def test_a_write_by_either_instance_reaches_the_others_copies_at_once(
    instances: list[JetStreamContext],
) -> None:
    mine, other = SettingsStore(instances[0]), SettingsStore(instances[1])
    await mine.watch()
    try:
        assert await mine.get("ada") is None  # kept: no settings
        await other.put("ada", SEVEN)
        async with asyncio.timeout(log.SETTINGS_COPY_SECONDS / 2):  # dropped, not expired
            while await mine.get("ada") != SEVEN:  # noqa: ASYNC110 (the watch is the point)
                await asyncio.sleep(0.01)
        await mine.put("ada", NINE)
        assert await mine.get("ada") == NINE  # its own write, at once
    finally:
        await mine.stop()


async def test_a_copy_serves_without_a_read_and_no_longer_than_its_limit(
    instances: list[JetStreamContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "SETTINGS_COPY_SECONDS", 0.5)
    js = instances[0]
    store = SettingsStore(js)
    await store.put("ada", SEVEN)
    await store.watch()
    try:
        assert await store.get("ada") == SEVEN
        # Gone with its bucket, unseen by the watch: a read finds none, the copy still serves.
        await js.delete_key_value(subjects.SETTINGS_BUCKET)
        assert await store.get("ada") == SEVEN
        assert await store.get("ada", fresh=True) is None
        assert await store.get("ada") is None  # the fresh read replaced the copy
        await ensure_streams(js)
        await SettingsStore(js).put("ada", NINE)  # in the new bucket, where the watch is lost
        await asyncio.sleep(0.6)
        assert await store.get("ada") == NINE
    finally:
        await store.stop()
