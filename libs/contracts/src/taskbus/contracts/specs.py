"""Value types shared by commands and events: what a conversation asks for, user settings."""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]


class NetworkMode(enum.StrEnum):
    NONE = "none"
    BRIDGE = "bridge"


class ConcurrencyPolicy(enum.StrEnum):
    EVICT_OLDEST = "evict_oldest"
    QUEUE = "queue"


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Time limits of one conversation; None means the operator default."""

    no_change_seconds: PositiveSeconds | None = None
    command_seconds: PositiveSeconds | None = None
    idle_seconds: PositiveSeconds | None = None
    max_duration_seconds: PositiveSeconds | None = None


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sandbox limits asked for; the runtime caps them by the operator's maxima."""

    cpus: Annotated[float, msgspec.Meta(gt=0, le=256)] | None = None
    memory_mb: Annotated[int, msgspec.Meta(ge=16, le=1024 * 1024)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=8, le=1_000_000)] | None = None
    network: NetworkMode | None = None


class ConversationSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /api/conversations: OpenHands' InitSessionRequest plus Taskbus' limits."""

    initial_user_msg: str | None = None
    repository: str | None = None
    git_provider: str | None = None
    selected_branch: str | None = None
    conversation_instructions: str | None = None
    mcp_config: dict[str, Any] | None = None
    title: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0
    max_budget_per_task: Annotated[float, msgspec.Meta(ge=1)] | None = None
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    confirmation_mode: bool = False
    timeouts: Timeouts = Timeouts()
    resources: Resources = Resources()


class UserSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-user settings (KV `taskbus_settings`). `llm_api_key` is write-only at the API."""

    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_base_url: str | None = None
    max_budget_per_task: Annotated[float, msgspec.Meta(ge=1)] | None = None
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    max_concurrent_conversations: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    no_change_timeout_seconds: PositiveSeconds | None = None
    concurrency_policy: ConcurrencyPolicy | None = None
