"""Idempotent creation of the JetStream streams and KV buckets every service relies on."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from taskbus.contracts import subjects

# Window in which JetStream drops a re-sent Nats-Msg-Id (idempotent appends and commands).
DEDUPE_WINDOW_SECONDS = 120.0


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.ALL_EVENTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DEDUPE_WINDOW_SECONDS,
            allow_direct=True,
            # No max_msgs_per_subject: per-subject limits slow JetStream down with many subjects.
        ),
        StreamConfig(
            name=subjects.COMMANDS_STREAM,
            subjects=[subjects.ALL_COMMANDS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DEDUPE_WINDOW_SECONDS,
        ),
    ]


def bucket_configs(replicas: int = 1) -> list[KeyValueConfig]:
    return [
        KeyValueConfig(bucket=subjects.CONVERSATIONS_BUCKET, history=1, replicas=replicas),
        KeyValueConfig(bucket=subjects.SETTINGS_BUCKET, history=5, replicas=replicas),
        KeyValueConfig(bucket=subjects.RUNNERS_BUCKET, history=1, replicas=replicas),
    ]


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create what is missing; safe to call from every service at start-up.

    An existing stream gets back only what Taskbus relies on (its subjects, direct gets, a long
    enough dedupe window) and keeps what an operator tuned: replicas, limits, placement. So a
    service restarting never turns an R3 stream back into R1 or lifts a size limit.
    """
    for config in stream_configs(replicas):
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        current = info.config
        required = current.evolve(
            subjects=config.subjects,
            allow_direct=config.allow_direct,
            duplicate_window=max(current.duplicate_window or 0, config.duplicate_window or 0),
        )
        if required != current:
            await js.update_stream(required)
    for bucket in bucket_configs(replicas):
        try:
            await js.key_value(bucket.bucket)
        except BucketNotFoundError:
            await js.create_key_value(bucket)
