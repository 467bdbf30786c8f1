"""`ensure_streams` creates what is missing and never undoes what an operator tuned."""

from __future__ import annotations

from pathlib import Path

import nats

from taskbus.contracts import subjects
from taskbus.contracts.streams import DEDUPE_WINDOW_SECONDS, ensure_streams
from taskbus.devtools.nats_server import NatsServer


async def test_restarting_services_keep_operator_limits_and_restore_what_taskbus_needs(
    tmp_path: Path,
) -> None:
    with NatsServer(tmp_path) as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            created = (await js.stream_info(subjects.EVENTS_STREAM)).config
            assert created.allow_direct and created.duplicate_window == DEDUPE_WINDOW_SECONDS
            # An operator caps the log, keeps a longer dedupe window, and turns direct gets off.
            tuned = created.evolve(
                max_bytes=50_000_000, max_age=30 * 86400, duplicate_window=600, allow_direct=False
            )
            await js.update_stream(tuned)

            await ensure_streams(js)  # any service starting

            kept = (await js.stream_info(subjects.EVENTS_STREAM)).config
            assert (kept.max_bytes, kept.max_age, kept.duplicate_window) == (
                50_000_000,
                30 * 86400,
                600,
            )
            assert kept.allow_direct  # the appender's reads need it
            assert kept.num_replicas == created.num_replicas == 1
            assert kept.subjects == [subjects.ALL_EVENTS]
        finally:
            await nc.drain()
