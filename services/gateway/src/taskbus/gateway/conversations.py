"""Conversation identity and state as the gateway serves it: pure functions, no I/O."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

import msgspec

from taskbus.contracts.events import (
    AgentStateChanged,
    ConversationCreated,
    ConversationDeleted,
    ConversationStatusChanged,
    LLMMetrics,
)
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.redaction import redact
from taskbus.contracts.status import AgentState, ConversationStatus

# Before session-manager's first ConversationStatusChanged, an accepted conversation waits.
INITIAL_STATUS = ConversationStatus.QUEUED


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


class LogTail(msgspec.Struct, frozen=True, kw_only=True):
    """The last event of a conversation in the log."""

    id: int
    timestamp: datetime


def fold_conversation(
    created: ConversationCreated,
    tail: LogTail,
    status: ConversationStatusChanged | None = None,
    agent_state: AgentStateChanged | None = None,
    metrics: LLMMetrics | None = None,
    deleted: ConversationDeleted | None = None,
) -> ConversationInfo:
    """The conversation's state from the latest event of each kind that shapes it, as
    event-store's projection folds it: once deleted, ARCHIVED whatever status came later."""
    if deleted is not None:
        current_status, reason = ConversationStatus.ARCHIVED, deleted.reason
    elif status is not None:
        current_status, reason = status.status, status.reason
    else:
        current_status, reason = INITIAL_STATUS, ""
    return ConversationInfo(
        conversation_id=created.conversation_id,
        user_id=created.user_id,
        title=created.title,
        status=current_status,
        agent_state=agent_state.agent_state if agent_state else None,
        status_reason=reason,
        repository=created.spec.repository,
        selected_branch=created.spec.selected_branch,
        priority=created.spec.priority,
        created_at=created.timestamp,
        updated_at=tail.timestamp,
        accumulated_cost=metrics.accumulated_cost if metrics else 0.0,
        event_count=tail.id + 1,
        last_event_id=tail.id,
    )


class ConversationView(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation as clients see it, with OpenHands' field names where it has one."""

    conversation_id: str
    title: str
    status: ConversationStatus
    agent_state: AgentState | None
    status_reason: str
    selected_repository: str | None
    selected_branch: str | None
    priority: int
    created_at: datetime
    last_updated_at: datetime
    accumulated_cost: float
    event_count: int
    last_event_id: int

    @classmethod
    def of(cls, info: ConversationInfo) -> ConversationView:
        return cls(
            conversation_id=info.conversation_id,
            title=info.title,
            status=info.status,
            agent_state=info.agent_state,
            status_reason=info.status_reason,
            # Refused at creation; masked here should an older event still carry one.
            selected_repository=None if info.repository is None else redact(info.repository),
            selected_branch=info.selected_branch,
            priority=info.priority,
            created_at=info.created_at,
            last_updated_at=info.updated_at,
            accumulated_cost=info.accumulated_cost,
            event_count=info.event_count,
            last_event_id=info.last_event_id,
        )


class CreatedConversation(msgspec.Struct, frozen=True, kw_only=True):
    """Answer to POST /api/conversations: OpenHands' `{status: "ok", conversation_id,
    conversation_status}` plus the whole conversation."""

    status: str = "ok"
    conversation_id: str
    conversation_status: ConversationStatus
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
