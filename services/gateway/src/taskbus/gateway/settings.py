"""Gateway configuration from `TASKBUS_*` environment variables; every default works on a laptop."""

from __future__ import annotations

from typing import Annotated

import msgspec

from taskbus.contracts.llm_endpoints import DEFAULT_ALLOWED_BASE_URLS

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # Replicas of the streams and KV buckets, if this service is the first to create them
    # (3 on a 3-node NATS cluster); existing ones keep what they have.
    stream_replicas: int = 1
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 3000
    # "key1=user1,key2=user2"; merged with the lines of `api_keys_file` (one `key=user` a line).
    api_keys: str = ""
    api_keys_file: str = ""
    # Bound of every wait on another service: command visibility, settings writes, queries.
    request_timeout_seconds: PositiveSeconds = 5.0
    ws_heartbeat_seconds: PositiveSeconds = 15.0
    # Live events queued for one WebSocket client before it is closed as a slow consumer.
    ws_max_buffered_events: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # Per-user limits, counted per gateway process (with N gateways a user gets N times these
    # until the counters move to a shared KV bucket, ARCHITECTURE §9).
    # Conversations a user may create per minute on average, and in one burst.
    create_rate_per_minute: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    create_burst: Annotated[int, msgspec.Meta(ge=1)] = 20
    # WebSockets a user may hold open at once.
    ws_max_per_user: Annotated[int, msgspec.Meta(ge=1)] = 20
    # Base URLs users' LLM settings may use, comma-separated (contracts/llm_endpoints.py); the
    # same value as session-manager's, which checks again before each call.
    llm_allowed_base_urls: str = DEFAULT_ALLOWED_BASE_URLS
    # The key that seals users' LLM keys before they enter NATS (contracts/secret_box.py), or a
    # file holding it; without one, a PUT with an LLM key is refused.
    secrets_key: str | None = None
    secrets_key_file: str | None = None
    # Largest trajectory (GET …/trajectory) answered in one reply (the sum of its stored
    # events); a longer one is a 413, to be read in pages from /events.
    trajectory_max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 16 * 1024 * 1024
    # Browser origins (comma-separated, e.g. "https://ops.example.com") whose pages may call
    # the API from another origin (CORS); none by default: the UI at / is same-origin.
    cors_origins: str = ""
    # Webhooks (gateway/webhooks_delivery.py): private addresses a webhook URL may name anyway,
    # listed by IP as for LLM base URLs (e.g. `http://10.0.0.7:8080`); attempts per delivery,
    # the wait before the first retry (doubling up to webhook_max_retry_seconds), and how long
    # one attempt may take.
    webhook_allowed_private_urls: str = ""
    webhook_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 6
    webhook_retry_seconds: PositiveSeconds = 10.0
    webhook_max_retry_seconds: PositiveSeconds = 600.0
    webhook_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0
    log_level: str = "INFO"
    # Set by `taskbus up` and echoed by /api/health as `instance`: the launcher counts a gateway
    # as ready only when it is its own, not another stack answering on the same port.
    instance_nonce: str | None = None
