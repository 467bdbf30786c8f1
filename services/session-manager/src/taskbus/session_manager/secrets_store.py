"""Users' secrets in KV `taskbus_secrets` (key = user id), of which session-manager is the only
writer: each secrets command is applied to the entry as last read, and written only if nobody
wrote it in between (the expected revision), else read again and re-applied, so two edits
(from two gateways, or two session-managers) never lose one another."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.commands import SecretsCommand, SecretsTooMany
from taskbus.contracts.user_secrets import UserSecrets, decode_user_secrets, encode_user_secrets

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 50


class SecretsStore:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(subjects.SECRETS_BUCKET)
        return self._kv

    async def _read(self, user_id: str) -> tuple[UserSecrets, int]:
        """The user's secrets and the revision they were read at (0: none yet)."""
        try:
            entry = await (await self._bucket()).get(user_id)
        except KeyNotFoundError as error:
            # A deleted entry leaves a marker: the next write must name its revision.
            return UserSecrets(), error.entry.revision if error.entry else 0
        return decode_user_secrets(entry.value or b"{}"), entry.revision or 0

    async def apply(self, command: SecretsCommand) -> None:
        """Store `command`'s change; a change the limits refuse is logged and dropped (the
        gateway checked them before sending, so only a concurrent edit gets here)."""
        kv = await self._bucket()
        for _ in range(_MAX_ATTEMPTS):
            stored, revision = await self._read(command.user_id)
            try:
                changed = command.applied_to(stored)
            except SecretsTooMany as refused:
                logger.warning(
                    "%s of user %s refused: %s", command.name(), command.user_id, refused
                )
                return
            if changed == stored:
                return
            try:
                await kv.update(command.user_id, encode_user_secrets(changed), last=revision)
            except KeyWrongLastSequenceError:
                continue  # written meanwhile: apply to the newer entry
            return
        raise RuntimeError(f"the secrets of user {command.user_id} kept changing; will retry")
