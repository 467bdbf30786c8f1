"""Webhooks: a user's URLs told of their conversations' status changes, signed, retried, logged.

A registration lives in KV `taskbus_webhooks`, one entry per user (key `user_key`), its signing
secret sealed for that user and webhook (contracts/secret_box.py): shown once at creation,
never again. Each status change becomes one `DeliveryJob` per matching webhook (message id =
`delivery_id`, so a fan-out done twice delivers once); every attempt is a `DeliveryAttempt` on
the webhook's subject of the delivery log.

What a receiver gets: a POST of `WebhookPayload` as JSON with
- `X-Taskbus-Signature: sha256=<hex HMAC-SHA256 of the raw body under the secret>`,
- `X-Taskbus-Delivery: <delivery_id>` (the same on every attempt of one delivery),
- `X-Taskbus-Timestamp: <unix seconds>` (this attempt's; the body's `sent_at` is the same).
It verifies the signature over the bytes it received (constant-time compare), then rejects a
replay: a `sent_at` more than a few minutes from its clock, or a `delivery_id` it has already
processed (delivery is at least once, so that check also drops a retry of a delivery it took).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from datetime import datetime
from typing import Annotated

import msgspec

from taskbus.contracts.specs import SealedSecret
from taskbus.contracts.status import ConversationStatus

MAX_WEBHOOKS_PER_USER = 10
MAX_URL_CHARS = 2000
# Ids are subject tokens (the delivery log's subject names the webhook).
WEBHOOK_ID_PATTERN = r"^wh_[0-9a-f]{32}$"
WebhookId = Annotated[str, msgspec.Meta(pattern=WEBHOOK_ID_PATTERN)]
SECRET_PREFIX = "whsec_"

SIGNATURE_HEADER = "X-Taskbus-Signature"
DELIVERY_HEADER = "X-Taskbus-Delivery"
TIMESTAMP_HEADER = "X-Taskbus-Timestamp"
EVENT_HEADER = "X-Taskbus-Event"


class WebhookEvent(enum.StrEnum):
    """What a delivery reports: each status change is one of these, never both."""

    STATUS_CHANGED = "conversation.status_changed"
    FINISHED = "conversation.finished"


def event_of(status: ConversationStatus) -> WebhookEvent:
    return (
        WebhookEvent.FINISHED
        if status is ConversationStatus.FINISHED
        else (WebhookEvent.STATUS_CHANGED)
    )


class Webhook(msgspec.Struct, frozen=True, kw_only=True):
    id: WebhookId
    url: Annotated[str, msgspec.Meta(max_length=MAX_URL_CHARS)]
    events: list[WebhookEvent]
    secret: SealedSecret
    created_at: datetime


class UserWebhooks(msgspec.Struct, frozen=True, kw_only=True):
    """A user's entry in the bucket, in creation order."""

    webhooks: Annotated[list[Webhook], msgspec.Meta(max_length=MAX_WEBHOOKS_PER_USER)] = []

    def find(self, webhook_id: str) -> Webhook | None:
        return next((hook for hook in self.webhooks if hook.id == webhook_id), None)


def user_key(user_id: str) -> str:
    """The user's key in the bucket: any user id becomes a valid KV key."""
    return hashlib.sha256(user_id.encode()).hexdigest()


def new_webhook_id() -> str:
    return f"wh_{secrets.token_hex(16)}"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_context(user_id: str, webhook_id: str) -> str:
    """A sealed secret opens only as this user's secret of this webhook."""
    return f"taskbus_webhooks/{user_id}/{webhook_id}"


def delivery_id(webhook_id: str, conversation_id: str, event_id: int) -> str:
    """One delivery per webhook and event, however often the event is fanned out."""
    digest = hashlib.sha256(f"{webhook_id}/{conversation_id}/{event_id}".encode()).hexdigest()
    return f"dl_{digest[:32]}"


class DeliveryJob(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery to make: retried by redelivery until it succeeds or is given up."""

    delivery_id: str
    webhook_id: WebhookId
    user_id: str
    event: WebhookEvent
    conversation_id: str
    event_id: int
    status: ConversationStatus
    reason: str = ""
    timestamp: datetime


class WebhookPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON body a receiver gets. `timestamp` is the status change's; `sent_at` this
    attempt's (signed with the rest); order deliveries of a conversation by `event_id`."""

    event: WebhookEvent
    delivery_id: str
    conversation_id: str
    event_id: int
    status: ConversationStatus
    reason: str
    timestamp: datetime
    sent_at: datetime


def payload_of(job: DeliveryJob, sent_at: datetime) -> bytes:
    return msgspec.json.encode(
        WebhookPayload(
            event=job.event,
            delivery_id=job.delivery_id,
            conversation_id=job.conversation_id,
            event_id=job.event_id,
            status=job.status,
            reason=job.reason,
            timestamp=job.timestamp,
            sent_at=sent_at,
        )
    )


def signature(secret: str, body: bytes) -> str:
    """The `X-Taskbus-Signature` value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class AttemptOutcome(enum.StrEnum):
    DELIVERED = "delivered"
    RETRYING = "retrying"
    FAILED = "failed"


# Answers worth another attempt: the receiver may take it later. Any other non-2xx (a 3xx
# included: redirects are never followed) gives up at once.
_RETRIED_STATUSES = frozenset({408, 429})


def outcome_of(status_code: int | None, attempt: int, max_attempts: int) -> AttemptOutcome:
    """What an attempt's answer (None: no answer, e.g. a timeout or refused connection) means."""
    if status_code is not None and 200 <= status_code < 300:
        return AttemptOutcome.DELIVERED
    retried = status_code is None or status_code >= 500 or status_code in _RETRIED_STATUSES
    if retried and attempt < max_attempts:
        return AttemptOutcome.RETRYING
    return AttemptOutcome.FAILED


def retry_delay(attempt: int, first_seconds: float, max_seconds: float) -> float:
    """Exponential backoff: the wait after failed attempt number `attempt` (1-based)."""
    return min(first_seconds * 2.0 ** (attempt - 1), max_seconds)


class DeliveryAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt, as the delivery log keeps it. `error` says why there was no answer (no
    secret, no response body)."""

    delivery_id: str
    webhook_id: WebhookId
    event: WebhookEvent
    conversation_id: str
    event_id: int
    status: ConversationStatus
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str = ""
    outcome: AttemptOutcome
    duration_ms: float = 0.0


class AttemptView(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    at: datetime
    status_code: int | None
    error: str
    outcome: AttemptOutcome
    duration_ms: float


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/webhooks/{id}/deliveries: one delivery with its attempts; `outcome` is its
    latest attempt's."""

    delivery_id: str
    event: WebhookEvent
    conversation_id: str
    event_id: int
    status: ConversationStatus
    outcome: AttemptOutcome
    attempts: list[AttemptView]


def deliveries(attempts: list[DeliveryAttempt]) -> list[Delivery]:
    """The log's attempts (in log order) grouped by delivery, newest delivery first."""
    grouped: dict[str, list[DeliveryAttempt]] = {}
    for attempt in attempts:
        grouped.setdefault(attempt.delivery_id, []).append(attempt)
    views = []
    for delivery_attempts in grouped.values():
        first, last = delivery_attempts[0], delivery_attempts[-1]
        views.append(
            Delivery(
                delivery_id=first.delivery_id,
                event=first.event,
                conversation_id=first.conversation_id,
                event_id=first.event_id,
                status=first.status,
                outcome=last.outcome,
                attempts=[
                    AttemptView(
                        attempt=a.attempt,
                        at=a.at,
                        status_code=a.status_code,
                        error=a.error,
                        outcome=a.outcome,
                        duration_ms=a.duration_ms,
                    )
                    for a in delivery_attempts
                ],
            )
        )
    return views[::-1]
