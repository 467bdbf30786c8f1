"""Event-store configuration from `TASKBUS_*` environment variables."""

from __future__ import annotations

from typing import Annotated

import msgspec

# clickhouse-connect reads `chdb:<path>` as an embedded engine at <path> (relative to the working
# directory), `chdb:///abs/path` as an absolute path and `http(s)://host:8123` as a server. Beware
# `chdb://./path`: its netloc "." would be taken as the location and "path" as the database.
DEFAULT_CLICKHOUSE_DSN = "chdb:.taskbus/clickhouse"


class EventStoreSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # Prometheus `/metrics` on this port (0: any free one, named in /api/health); unset: none.
    # Unauthenticated: keep the host where only the scraper reaches.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Replicas of the streams and KV buckets, if this service is the first to create them
    # (3 on a 3-node NATS cluster); existing ones keep what they have.
    stream_replicas: int = 1
    clickhouse_dsn: str = DEFAULT_CLICKHOUSE_DSN
    # Names the partitions' durable consumers and their leases; a fresh name with fresh tables
    # replays the whole log (rebuild).
    consumer_name: str = "event_store"
    # This instance's name among the event-stores sharing the partitions (their leases); empty:
    # the host name and process id. Several instances need a ClickHouse server (`http://`).
    instance_id: str = ""
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    # The least time between the starts of two writes to ClickHouse; under load they are spaced
    # further, up to a second, by what they cost (`ingest.write_spacing`), unless a query waits.
    flush_interval_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 100
    # ClickHouse connections answering queries, so a slow search does not hold up the others.
    query_connections: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    # Conversations whose status projection the ingest holds in memory (the most recently
    # ingested); an event of another looks its projection up in ClickHouse.
    conversation_cache_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    # Read-your-writes: how long a query waits for the ingest to reach the log as it was when
    # the query arrived (see `consistency`) before answering 503; keep it below the gateway's
    # request timeout (5 s by default) so the gateway hears the 503 rather than timing out.
    read_wait_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 4000
    # Test hook, 0 in production: a pause before each ingested batch, to show that reads stay
    # consistent with a slow ingest (tests/test_read_your_writes.py).
    ingest_delay_ms: Annotated[int, msgspec.Meta(ge=0, le=5_000)] = 0
