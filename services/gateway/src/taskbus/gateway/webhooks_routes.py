"""/api/webhooks: a user's webhooks (contracts/webhooks.py), each user seeing only their own.

A URL must pass the rule LLM base URLs pass (contracts/llm_endpoints.py): http(s), no
credentials, query or fragment, and a host that is public when checked (here, and again at
every attempt), unless the operator listed its private address by IP
(`TASKBUS_WEBHOOK_ALLOWED_PRIVATE_URLS`). The signing secret is made here, answered once, and
stored sealed for its user and webhook.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec
import nats.errors
from fastapi import APIRouter, Path, Request, Response

from taskbus.contracts.llm_endpoints import (
    AllowList,
    EndpointRefused,
    EndpointUnresolved,
    check_open_destination,
)
from taskbus.contracts.webhooks import (
    MAX_URL_CHARS,
    MAX_WEBHOOKS_PER_USER,
    WEBHOOK_ID_PATTERN,
    Delivery,
    UserWebhooks,
    Webhook,
    WebhookEvent,
    deliveries,
    new_secret,
    new_webhook_id,
    secret_context,
)
from taskbus.gateway.bus import unavailable
from taskbus.gateway.dependencies import BusDep, UserId, sealing_box
from taskbus.gateway.problems import Problem
from taskbus.gateway.rest import json_response, typed_body
from taskbus.gateway.webhooks_store import WebhookStore

router = APIRouter(prefix="/api")

WebhookIdPath = Annotated[str, Path(description="The webhook's id.", pattern=WEBHOOK_ID_PATTERN)]


class WebhookBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/webhooks."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL_CHARS)]
    events: Annotated[list[WebhookEvent], msgspec.Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: list(WebhookEvent)
    )


class WebhookView(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook as listed: never its secret."""

    id: str
    url: str
    events: list[WebhookEvent]
    created_at: datetime

    @classmethod
    def of(cls, hook: Webhook) -> WebhookView:
        return cls(id=hook.id, url=hook.url, events=hook.events, created_at=hook.created_at)


class CreatedWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """The new webhook and its signing secret, which is shown this once."""

    id: str
    url: str
    events: list[WebhookEvent]
    created_at: datetime
    secret: str


class WebhookList(msgspec.Struct, frozen=True, kw_only=True):
    webhooks: list[WebhookView]


class DeliveryList(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook's deliveries, newest first, each with every attempt (the log keeps a
    webhook's last few hundred attempts, for a week)."""

    deliveries: list[Delivery]


class WebhookDeleted(msgspec.Struct, frozen=True, kw_only=True):
    message: str


def _invalid(detail: str) -> Problem:
    return Problem(422, detail, kind="validation-error", title="Invalid webhook")


def _not_found(webhook_id: str) -> Problem:
    return Problem(404, f"webhook {webhook_id} not found", kind="not-found")


def _store(request: Request) -> WebhookStore:
    store: WebhookStore = request.app.state.webhook_store
    return store


async def _owned(request: Request, user: str, webhook_id: str) -> Webhook:
    try:
        hook = (await _store(request).of_user(user)).find(webhook_id)
    except (nats.errors.Error, TimeoutError) as error:
        raise unavailable("the webhooks store") from error
    if hook is None:
        raise _not_found(webhook_id)
    return hook


@router.post("/webhooks", status_code=201, summary="Register a webhook")
async def create_webhook(request: Request, user: UserId, bus: BusDep) -> Response:
    """Body: `{url, events}`. Each status change of your conversations is POSTed to `url` as
    JSON, signed with HMAC-SHA256 under the secret this answer shows once (the
    `X-Taskbus-Signature` header; see contracts/webhooks.py for how to verify and reject
    replays). `events` filters: `conversation.finished` (a change to FINISHED) and
    `conversation.status_changed` (every other change); both by default. A URL that is or
    resolves to a loopback, private or link-local address is a 422."""
    body = await typed_body(request, bus, WebhookBody)
    allowed: AllowList = request.app.state.webhook_private_urls
    try:
        await check_open_destination(body.url, allowed)
    except EndpointUnresolved:
        pass  # checked again before every attempt, when it may resolve
    except EndpointRefused as error:
        raise _invalid(str(error)) from None
    box = sealing_box(request, "cannot sign webhooks", "Webhooks unavailable")
    secret = new_secret()
    hook_id = new_webhook_id()
    hook = Webhook(
        id=hook_id,
        url=body.url.strip(),
        events=sorted(set(body.events)),
        secret=box.seal(secret, secret_context(user, hook_id)),
        created_at=datetime.now(UTC),
    )

    def add(current: UserWebhooks) -> UserWebhooks:
        if len(current.webhooks) >= MAX_WEBHOOKS_PER_USER:
            raise _invalid(f"at most {MAX_WEBHOOKS_PER_USER} webhooks may be registered")
        return UserWebhooks(webhooks=[*current.webhooks, hook])

    try:
        await _store(request).change(user, add)
    except (nats.errors.Error, TimeoutError) as error:
        raise unavailable("the webhooks store") from error
    view = WebhookView.of(hook)
    created = CreatedWebhook(**msgspec.structs.asdict(view), secret=secret)
    return json_response(created, 201)


@router.get("/webhooks", summary="Your webhooks")
async def list_webhooks(request: Request, user: UserId) -> Response:
    """Ids, URLs and event filters, in the order they were registered; never their secrets."""
    try:
        stored = await _store(request).of_user(user)
    except (nats.errors.Error, TimeoutError) as error:
        raise unavailable("the webhooks store") from error
    return json_response(WebhookList(webhooks=[WebhookView.of(hook) for hook in stored.webhooks]))


@router.delete("/webhooks/{webhook_id}", summary="Delete a webhook")
async def delete_webhook(request: Request, webhook_id: WebhookIdPath, user: UserId) -> Response:
    """No delivery to it is attempted from now on, and its delivery log can no longer be read
    (it ages out within a week; ids are never reused). 404 for an unknown webhook, and for
    another user's."""
    await _owned(request, user, webhook_id)

    def remove(current: UserWebhooks) -> UserWebhooks:
        if current.find(webhook_id) is None:
            raise _not_found(webhook_id)  # deleted meanwhile
        return UserWebhooks(webhooks=[hook for hook in current.webhooks if hook.id != webhook_id])

    try:
        await _store(request).change(user, remove)
    except (nats.errors.Error, TimeoutError) as error:
        raise unavailable("the webhooks store") from error
    return json_response(WebhookDeleted(message="Webhook deleted"))


@router.get("/webhooks/{webhook_id}/deliveries", summary="A webhook's delivery log")
async def list_deliveries(request: Request, webhook_id: WebhookIdPath, user: UserId) -> Response:
    """Each delivery (one status change) with every attempt: its number, time, the receiver's
    status code or why there was none, and whether it was delivered, will be retried or was
    given up. 404 for an unknown webhook, and for another user's."""
    await _owned(request, user, webhook_id)
    try:
        attempts = await _store(request).attempts(webhook_id)
    except (nats.errors.Error, TimeoutError) as error:
        raise unavailable("the delivery log") from error
    return json_response(DeliveryList(deliveries=deliveries(attempts)))
