"""Idempotent creation of the JetStream streams and KV buckets every service relies on.

Limits: the operator sets them (`StreamLimits`, from `TASKBUS_*` variables) and the holder of the
admin credential applies them (`taskbus up`, or `python -m taskbus.contracts.streams` in a
deployment). The event log and the command queue discard NEW messages when full: the writer gets
an error (`appender.StreamFull`, a 503 at the gateway) and no conversation's history is ever
dropped to make room. `events_max_age_seconds` is a retention choice and is off by default: when
set, whole events older than it are removed, live conversation or not.
"""

from __future__ import annotations

import asyncio
import json
import logging

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect, nats_url_from_env
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.observability_health import HEALTH_TTL_SECONDS
from taskbus.contracts.partitions import LEASE_SECONDS

logger = logging.getLogger(__name__)

# Window in which JetStream drops a re-sent Nats-Msg-Id (idempotent appends and commands).
DEDUPE_WINDOW_SECONDS = 120.0
# How long a command's verdict is kept: longer than the dedupe window, so a retry finds it.
VERDICT_TTL_SECONDS = 10 * DEDUPE_WINDOW_SECONDS
RUNNER_WORK_MAX_AGE_SECONDS = 7 * 86400.0
# The delivery log keeps a webhook's last attempts, for a week at most.
WEBHOOK_LOG_ATTEMPTS = 200
WEBHOOK_LOG_MAX_AGE_SECONDS = 7 * 86400.0
_GIB = 1024**3
_MIB = 1024**2
# The most one batch direct get sends (`read_batch`): nats-py holds 64 MiB per subscription.
_BATCH_BYTES = 8 * _MIB


class StreamLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Operator limits of the streams (`TASKBUS_EVENTS_MAX_BYTES`, ...); 0 means none."""

    events_max_bytes: int = 10 * _GIB
    events_max_age_seconds: float = 0
    commands_max_bytes: int = 256 * _MIB
    commands_max_msgs: int = 100_000
    # Dead letters are diagnostics: the oldest go first when the stream is full.
    deadletter_max_bytes: int = 64 * _MIB
    deadletter_max_msgs: int = 10_000
    deadletter_max_age_seconds: float = 30 * 86400


def stream_limits_from_env() -> StreamLimits:
    return settings_from_env(StreamLimits)


def _limit(value: float, none: int = -1) -> int:
    """JetStream's own spelling of a limit: -1 (0 for ages) means none."""
    return int(value) if value > 0 else none


def stream_configs(replicas: int = 1, limits: StreamLimits | None = None) -> list[StreamConfig]:
    limits = limits or StreamLimits()
    return [
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.ALL_EVENTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DEDUPE_WINDOW_SECONDS,
            allow_direct=True,
            # One decision's events are appended all or none (`EventAppender.append_decision`).
            allow_atomic=True,
            discard=DiscardPolicy.NEW,
            max_bytes=_limit(limits.events_max_bytes),
            max_age=_limit(limits.events_max_age_seconds, none=0),
            # No max_msgs_per_subject: per-subject limits slow JetStream down with many subjects.
        ),
        _work_queue(subjects.COMMANDS_STREAM, subjects.ALL_COMMANDS, replicas, limits),
        # Work for a runner that never comes back goes after a week: its conversations were
        # declared lost long before. A re-forwarded event is dropped by the dedupe window.
        _work_queue(
            subjects.RUNNER_WORK_STREAM,
            subjects.ALL_RUNNER_WORK,
            replicas,
            limits,
            max_age=RUNNER_WORK_MAX_AGE_SECONDS,
        ),
        StreamConfig(
            name=subjects.DEADLETTER_STREAM,
            subjects=[subjects.ALL_DEADLETTERS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            discard=DiscardPolicy.OLD,
            max_bytes=_limit(limits.deadletter_max_bytes),
            max_msgs=_limit(limits.deadletter_max_msgs),
            max_age=_limit(limits.deadletter_max_age_seconds, none=0),
        ),
        # Webhook deliveries waiting for their next attempt; one past its retries is gone.
        _work_queue(
            subjects.WEBHOOK_JOBS_STREAM,
            subjects.ALL_WEBHOOK_JOBS,
            replicas,
            limits,
            max_age=WEBHOOK_LOG_MAX_AGE_SECONDS,
        ),
        # Every delivery attempt, for its webhook's owner to read: a diagnostic, so bounded per
        # webhook and in age and size, the oldest going first (few subjects: one per webhook).
        StreamConfig(
            name=subjects.WEBHOOK_LOG_STREAM,
            subjects=[subjects.ALL_WEBHOOK_LOGS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            allow_direct=True,
            discard=DiscardPolicy.OLD,
            max_msgs_per_subject=WEBHOOK_LOG_ATTEMPTS,
            max_bytes=_limit(limits.deadletter_max_bytes),
            max_age=WEBHOOK_LOG_MAX_AGE_SECONDS,
        ),
    ]


def _work_queue(
    name: str, subject: str, replicas: int, limits: StreamLimits, max_age: float = 0
) -> StreamConfig:
    """A queue whose messages go once acked, deduplicated by `Nats-Msg-Id`, refusing new ones
    when full (the sender gets the error), bounded like the command queue."""
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DEDUPE_WINDOW_SECONDS,
        discard=DiscardPolicy.NEW,
        max_bytes=_limit(limits.commands_max_bytes),
        max_msgs=_limit(limits.commands_max_msgs),
        max_age=max_age,
    )


def bucket_configs(replicas: int = 1) -> list[KeyValueConfig]:
    return [
        KeyValueConfig(bucket=subjects.CONVERSATIONS_BUCKET, history=1, replicas=replicas),
        KeyValueConfig(bucket=subjects.SETTINGS_BUCKET, history=5, replicas=replicas),
        KeyValueConfig(bucket=subjects.RUNNERS_BUCKET, history=1, replicas=replicas),
        # history=1: a replaced or deleted secret's sealed value is gone, not kept as history.
        KeyValueConfig(bucket=subjects.SECRETS_BUCKET, history=1, replicas=replicas),
        KeyValueConfig(
            bucket=subjects.VERDICTS_BUCKET, history=1, ttl=VERDICT_TTL_SECONDS, replicas=replicas
        ),
        KeyValueConfig(bucket=subjects.ADMISSION_BUCKET, history=1, replicas=replicas),
        # history=1, as for secrets: a webhook's sealed signing secret goes with its entry.
        KeyValueConfig(bucket=subjects.WEBHOOKS_BUCKET, history=1, replicas=replicas),
        # history=1: only the latest snapshot is of use, and a purge leaves nothing behind.
        KeyValueConfig(bucket=subjects.SNAPSHOTS_BUCKET, history=1, replicas=replicas),
        # A lease lives until LEASE_SECONDS after its last renewal.
        KeyValueConfig(
            bucket=subjects.PARTITIONS_BUCKET, history=1, ttl=LEASE_SECONDS, replicas=replicas
        ),
        # A silent (killed) instance stays listed as not ready this long after its last beat.
        KeyValueConfig(
            bucket=subjects.HEALTH_BUCKET, history=1, ttl=HEALTH_TTL_SECONDS, replicas=replicas
        ),
    ]


async def last_message(
    js: JetStreamContext, subject: str, stream: str = subjects.EVENTS_STREAM
) -> RawStreamMsg | None:
    """The last message on `subject` (a wildcard or not), read from any replica (direct get),
    or None when the subject has none. The one way every service reads "the latest event of"."""
    try:
        return await js.get_last_msg(stream, subject, direct=True)
    except NotFoundError:
        return None


class BatchReadError(nats.errors.Error):
    """A batch direct get the stream did not answer as ADR-31 says (no responder, an error
    status, or a server older than 2.11 that answers one message and no end of batch). A bus
    error like nats-py's own, so consumers retry it (e.g. while a leader settles) rather than
    count it towards a poison message."""


async def read_batch(
    js: JetStreamContext,
    subject: str,
    first: int,
    limit: int,
    stream: str = subjects.EVENTS_STREAM,
    idle_timeout: float = 5.0,
) -> tuple[list[tuple[int, bytes]], int]:
    """Up to `limit` messages on `subject` (a wildcard or not) from stream sequence `first` on,
    each with its sequence, and how many more match after them: one JetStream batch direct get
    (ADR-31, nats-server 2.11+), answered by any replica. One request and its replies, where a
    consumer costs a create, flow control and a delete; `idle_timeout` bounds each wait for the
    next reply, not the whole batch.

    The server sends a batch without flow control, so it is bounded in bytes too
    (`_BATCH_BYTES`, well under the subscription's pending limit), and each reply names the
    sequence of the one before it: a reply lost on the way (a slow consumer's drop) is an
    error, never a silent gap."""
    nc = js._nc
    messages: list[tuple[int, bytes]] = []
    end: asyncio.Future[tuple[int, Exception | None]] = asyncio.get_running_loop().create_future()

    def fail(problem: str) -> None:
        end.set_result((0, BatchReadError(f"batch direct get on {stream}: {problem}")))

    async def received(msg: Msg) -> None:
        if end.done():
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        previous = str(messages[-1][0]) if messages else "0"
        if status == "404" and not messages:  # nothing matches
            end.set_result((0, None))
        elif status not in (None, "204") or "Nats-Num-Pending" not in headers:
            fail(status or "a reply without Nats-Num-Pending (nats-server < 2.11?)")
        elif headers.get("Nats-Last-Sequence") != previous:
            fail(f"a reply after sequence {previous} was lost")
        elif status == "204":  # end of batch
            end.set_result((int(headers["Nats-Num-Pending"]), None))
        else:
            messages.append((int(headers["Nats-Sequence"]), msg.data))

    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox, cb=received)
    try:
        request = {"seq": first, "next_by_subj": subject, "batch": limit, "max_bytes": _BATCH_BYTES}
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), inbox)
        while not end.done():
            seen = len(messages)
            try:
                await asyncio.wait_for(asyncio.shield(end), idle_timeout)
            except TimeoutError:
                if len(messages) == seen:
                    raise BatchReadError(f"batch direct get on {stream}: no reply") from None
        pending, error = end.result()
    finally:
        await replies.unsubscribe()
    if error is not None:
        raise error
    return messages, pending


async def ensure_streams(
    js: JetStreamContext, replicas: int = 1, limits: StreamLimits | None = None
) -> None:
    """Create what is missing; safe to call from every service at start-up.

    An existing stream gets back only what Taskbus relies on (its subjects, direct gets, atomic
    batches, a long enough dedupe window, discarding new messages when full) and keeps what an
    operator tuned: replicas, placement, and its limits unless `limits` is given (the
    launcher's admin credential passes the operator's). A service whose credential may only
    read (see the bus permissions) finds everything in place and writes nothing.
    """
    try:
        for config in stream_configs(replicas, limits):
            await _ensure_stream(js, config, apply_limits=limits is not None)
        for bucket in bucket_configs(replicas):
            try:
                await js.key_value(bucket.bucket)
            except BucketNotFoundError:
                await js.create_key_value(bucket)
    except TimeoutError:  # also how a denied JetStream API request ends: never answered
        logger.error(
            "the streams did not answer: JetStream may have no leader yet, or they are missing"
            " or outdated and this NATS credential may not change them; the admin credential"
            " creates them (`taskbus up` does; `python -m taskbus.contracts.streams` in a"
            " deployment)"
        )
        raise


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, apply_limits: bool) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    current = info.config
    required = current.evolve(
        subjects=config.subjects,
        allow_direct=bool(current.allow_direct or config.allow_direct),
        allow_atomic=current.allow_atomic or config.allow_atomic,  # None when neither sets it
        duplicate_window=max(current.duplicate_window or 0, config.duplicate_window or 0),
        discard=config.discard,
    )
    if apply_limits:
        required = required.evolve(
            max_bytes=config.max_bytes, max_msgs=config.max_msgs, max_age=config.max_age
        )
    if required != current:
        await js.update_stream(required)


async def _main() -> None:
    """Create or update the streams with the operator's limits, as the admin credential."""
    nc = await connect(nats_url_from_env(), name="taskbus-streams")
    try:
        await ensure_streams(
            nc.jetstream(), settings_from_env(_Replicas).stream_replicas, stream_limits_from_env()
        )
    finally:
        await nc.drain()
    logger.info("streams and buckets are in place")


class _Replicas(msgspec.Struct, frozen=True):
    stream_replicas: int = 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_main())
