"""Operator settings of session-manager (`TASKBUS_*`); per-user settings in KV override them."""

from __future__ import annotations

from typing import Annotated

import msgspec

from taskbus.contracts.llm_endpoints import DEFAULT_ALLOWED_BASE_URLS
from taskbus.contracts.specs import ConcurrencyPolicy

# 101: a load then reads at most 100 events after its snapshot, about what a 100-event
# conversation costs read whole, so a reload costs the same at any length (issue 13: within
# 1.2x of 100 events; at 500 the longest tail was 4x). The price: a snapshot (the whole state,
# its history included) every 101 events of a conversation (bench/history_bench.py).
SNAPSHOT_EVERY_EVENTS = 101


class SessionManagerSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # Prometheus `/metrics` on this port (0: any free one, named in /api/health); unset: none.
    # Unauthenticated: keep the host where only the scraper reaches.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Replicas of the streams and KV buckets, if this service is the first to create them
    # (3 on a 3-node NATS cluster); existing ones keep what they have.
    stream_replicas: int = 1
    llm_model: str = "openai/scripted"
    llm_base_url: str | None = None
    llm_api_key: str | None = None  # never logged, never in events
    # Base URLs users' own LLM settings may use, comma-separated (see contracts/llm_endpoints.py;
    # list a private endpoint by its IP address). The operator's llm_base_url is not checked.
    llm_allowed_base_urls: str = DEFAULT_ALLOWED_BASE_URLS
    # The key that opens users' sealed LLM keys (contracts/secret_box.py): the key itself, or a
    # file holding it (`taskbus up` writes <data dir>/secrets.key). Without one, user keys are
    # refused at the API.
    secrets_key: str | None = None
    secrets_key_file: str | None = None
    # When set, the model's prices are registered with litellm so every completion is costed.
    llm_input_cost_per_token: float | None = None
    llm_output_cost_per_token: float | None = None
    llm_num_retries: int = 3  # retries of rate-limited / unavailable calls
    llm_retry_backoff_seconds: float = 2.0  # first backoff; doubles on each retry
    # One attempt's deadline: past it the attempt is abandoned (and retried like an unavailable
    # model); after the last, the conversation is in ERROR with reason `llm_timeout`.
    llm_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    # While an attempt waits, an `LLMWaiting` event this often, so a slow model is visible.
    llm_heartbeat_seconds: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    # Prompt size that triggers condensation; None: the model's context as litellm knows it.
    llm_max_input_tokens: int | None = None
    condensation_keep_recent_events: int = 6  # never condensed away
    stuck_repetitions: int = 4  # the same action with the same result this often: stuck
    max_running: int = 8  # conversations holding a sandbox, across all users
    max_concurrent_conversations: int = 3  # per user, unless the user's settings say otherwise
    # Operator maxima of what a user may ask for (user settings and requests are capped by them).
    max_concurrent_conversations_limit: int = 4  # a user's running conversations
    max_priority: int = 0  # a request's priority above it is lowered to it
    max_budget_per_task_limit: float | None = 10.0  # USD per task; None: no maximum
    # A user's QUEUED conversations; one more is refused (ConversationRejected, HTTP 429).
    max_queued_conversations: int = 20
    concurrency_policy: ConcurrencyPolicy = ConcurrencyPolicy.EVICT_OLDEST
    max_iterations: int = 50
    # Conversation time limits unless the request sets them (see time_limits.py); None: none.
    idle_seconds: float | None = 1800.0
    # A finished or failed conversation gives its sandbox back after this long without events
    # (the workspace stays; a later message gets a new sandbox on it); None: at `idle_seconds`.
    sandbox_release_seconds: Annotated[float, msgspec.Meta(gt=0)] | None = 60.0
    max_duration_seconds: float | None = None
    time_limit_check_seconds: float = 1.0
    max_budget_per_task: float | None = None
    # This instance's name among the session-managers sharing the partitions (their leases);
    # empty: the host name and process id.
    instance_id: str = ""
    # A runner whose heartbeat has not changed for this long is lost: its conversations get a
    # `RuntimeLost` (a runner restarting within it keeps them).
    runner_lost_seconds: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    # Workspaces live on storage every runner mounts at the same path: a lost runner's
    # conversations restart on another runner instead of failing.
    shared_workspaces: bool = False
    # How long placing a sandbox waits for a runner to register before it fails and is retried.
    placement_wait_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # A snapshot of a conversation's folded state once this many events have come since the
    # last (KV taskbus_snapshots): a load reads it and the log's tail (session_manager.snapshots).
    snapshot_every_events: Annotated[int, msgspec.Meta(ge=1)] = SNAPSHOT_EVERY_EVENTS
