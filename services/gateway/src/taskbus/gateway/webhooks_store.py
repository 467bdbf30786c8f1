"""The gateway's webhook state in NATS: users' registrations (KV `taskbus_webhooks`, one entry
per user, written only by gateways, revision-checked so concurrent changes never lose one
another) and the delivery log (stream TASKBUS_WEBHOOK_LOG, one subject per webhook)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.webhooks import DeliveryAttempt, UserWebhooks, user_key

_entry_decoder = msgspec.json.Decoder(UserWebhooks)
_attempt_decoder = msgspec.json.Decoder(DeliveryAttempt)


class WebhookStore:
    def __init__(self, js: JetStreamContext, bucket: KeyValue) -> None:
        self._js = js
        self._bucket = bucket

    @classmethod
    async def open(cls, js: JetStreamContext) -> WebhookStore:
        return cls(js, await js.key_value(subjects.WEBHOOKS_BUCKET))

    async def of_user(self, user_id: str) -> UserWebhooks:
        return (await self._read(user_id))[0]

    async def change(
        self, user_id: str, change: Callable[[UserWebhooks], UserWebhooks]
    ) -> UserWebhooks:
        """Apply `change` to the stored entry and store the result, re-reading and applying it
        again when another write came first. `change` may raise to refuse."""
        key = user_key(user_id)
        while True:
            current, revision = await self._read(user_id)
            changed = change(current)
            try:
                if revision is None:
                    await self._bucket.create(key, msgspec.json.encode(changed))
                else:
                    await self._bucket.update(key, msgspec.json.encode(changed), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return changed

    async def _read(self, user_id: str) -> tuple[UserWebhooks, int | None]:
        try:
            entry = await self._bucket.get(user_key(user_id))
        except KeyNotFoundError:
            return UserWebhooks(), None
        return _entry_decoder.decode(entry.value or b"{}"), entry.revision

    # --- the delivery log -------------------------------------------------------------------

    async def log(self, attempt: DeliveryAttempt) -> None:
        await self._js.publish(
            subjects.webhook_log_subject(attempt.webhook_id),
            msgspec.json.encode(attempt),
            stream=subjects.WEBHOOK_LOG_STREAM,
        )

    async def attempts(self, webhook_id: str) -> list[DeliveryAttempt]:
        """The webhook's logged attempts, oldest first (the log keeps its last few hundred).
        Read by direct gets, one message each: the subject holds a bounded number."""
        subject = subjects.webhook_log_subject(webhook_id)
        found: list[DeliveryAttempt] = []
        sequence = 1
        while True:
            try:
                message = await self._js.get_msg(
                    subjects.WEBHOOK_LOG_STREAM, sequence, subject=subject, next=True, direct=True
                )
            except NotFoundError:
                return found
            assert message.seq is not None
            sequence = message.seq + 1
            try:
                found.append(_attempt_decoder.decode(message.data or b""))
            except msgspec.DecodeError:
                continue  # only the gateway writes the log; an unreadable record is skipped
