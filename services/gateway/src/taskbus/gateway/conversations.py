"""Conversation identity and state as the gateway serves it: pure functions, no I/O."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

import msgspec

from taskbus.contracts.openhands import OPENHANDS_RUNTIME_STATUS, OPENHANDS_STATUS, OpenHandsStatus
from taskbus.contracts.queries import ConversationInfo, ResourceUsageInfo
from taskbus.contracts.redaction import redact
from taskbus.contracts.status import AgentState, ConversationStatus


def _request_id(user_id: str, idempotency_key: str | None, *scope: str) -> str:
    """A fresh id without an Idempotency-Key; with one, an id derived from (user, scope, key),
    so a retried request gets the same id. The user id is length-prefixed in the hash, so two
    users' keys never collide."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    material = ":".join([str(len(user_id)), user_id, *scope, idempotency_key])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def conversation_id_for(user_id: str, idempotency_key: str | None) -> str:
    """The id of a new conversation: a retried POST names the same conversation."""
    return _request_id(user_id, idempotency_key)


class ConversationView(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation as clients see it: OpenHands' ConversationInfo (its `status` in OpenHands'
    five words, see taskbus.contracts.openhands) plus Taskbus' own state in `taskbus_status`,
    `agent_state` and `status_reason`."""

    conversation_id: str
    title: str
    status: OpenHandsStatus
    taskbus_status: ConversationStatus
    agent_state: AgentState | None
    status_reason: str
    runtime_status: str | None
    selected_repository: str | None
    selected_branch: str | None
    git_provider: str | None
    trigger: str | None
    # Where the conversation's endpoints are (OpenHands' frontend calls `{url}/...`); no
    # session key: the API key is the only credential.
    url: str
    session_api_key: None = None
    num_connections: int = 0
    pr_number: list[int] = []
    priority: int
    created_at: datetime
    last_updated_at: datetime
    accumulated_cost: float
    event_count: int
    last_event_id: int
    depends_on: list[str] = []
    resource_usage: ResourceUsageInfo | None = None

    @classmethod
    def of(cls, info: ConversationInfo) -> ConversationView:
        return cls(
            conversation_id=info.conversation_id,
            title=info.title,
            status=OPENHANDS_STATUS[info.status],
            taskbus_status=info.status,
            agent_state=info.agent_state,
            status_reason=info.status_reason,
            runtime_status=OPENHANDS_RUNTIME_STATUS[info.status],
            # Refused at creation; masked here should an older event still carry one.
            selected_repository=None if info.repository is None else redact(info.repository),
            selected_branch=info.selected_branch,
            git_provider=info.git_provider,
            trigger=info.trigger,
            url=f"/api/conversations/{info.conversation_id}",
            priority=info.priority,
            created_at=info.created_at,
            last_updated_at=info.updated_at,
            accumulated_cost=info.accumulated_cost,
            event_count=info.event_count,
            last_event_id=info.last_event_id,
            depends_on=info.depends_on,
            resource_usage=info.resource_usage,
        )


class CreatedConversation(msgspec.Struct, frozen=True, kw_only=True):
    """Answer to POST /api/conversations: OpenHands' `{status: "ok", conversation_id,
    conversation_status}` plus the whole conversation."""

    status: str = "ok"
    conversation_id: str
    conversation_status: OpenHandsStatus
    conversation: ConversationView


class ConversationList(msgspec.Struct, frozen=True, kw_only=True):
    results: list[ConversationView]
    next_page_id: str | None


def command_msg_id(
    command_name: str, conversation_id: str, user_id: str, idempotency_key: str | None
) -> str:
    """`Nats-Msg-Id` of a command: stable for a retried request carrying an Idempotency-Key,
    unique otherwise (so two deliberate identical requests both count)."""
    return _request_id(user_id, idempotency_key, conversation_id, command_name)
