"""The KV status projection (`taskbus_conversations`): the gateway's fast path for status.

Writes are compare-and-set on the key's revision and skip a value that is not newer than what the
bucket holds, so neither a replay, a redelivery nor a second event-store instance can move a
conversation backwards. The revision last written is cached, so the happy path is one publish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store.projection import is_newer

_MAX_ATTEMPTS = 20
# Puts in flight at once when overwriting the whole projection.
_OVERWRITE_CHUNK = 500

_decoder = msgspec.json.Decoder(ConversationInfo)


def stored_value(info: ConversationInfo) -> bytes:
    """What the bucket keeps of a conversation: all of it, or of a deleted one (ARCHIVED) a
    tombstone with nothing of what it was about (no user, title or repository). The tombstone
    outlives the purged log: the gateway answers 404 for it and session-manager never creates
    the id again (see `purge`)."""
    if info.status is ConversationStatus.ARCHIVED:
        info = ConversationInfo(
            conversation_id=info.conversation_id,
            user_id="",
            title="",
            status=info.status,
            status_reason=info.status_reason,
            created_at=info.updated_at,
            updated_at=info.updated_at,
            event_count=info.event_count,
            last_event_id=info.last_event_id,
        )
    return msgspec.json.encode(info)


class ConversationStatusKV:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        # conversation_id -> revision of the value this process last wrote or read.
        self._revisions: dict[str, int] = {}

    async def publish_all(self, conversations: Iterable[ConversationInfo]) -> None:
        await asyncio.gather(*(self.publish(info) for info in conversations))

    async def publish(self, info: ConversationInfo) -> None:
        key = info.conversation_id
        value = stored_value(info)
        revision = self._revisions.get(key)
        for _ in range(_MAX_ATTEMPTS):
            if revision is None:
                current, revision = await self._read(key)
                if current is not None and not is_newer(info, current):
                    self._revisions[key] = revision
                    return
            try:
                self._revisions[key] = await self._kv.update(key, value, last=revision)
                return
            except KeyWrongLastSequenceError:
                revision = None  # someone else wrote: re-read and compare
        raise RuntimeError(f"could not update the status of {key} after {_MAX_ATTEMPTS} attempts")

    async def overwrite_all(self, conversations: Iterable[ConversationInfo]) -> None:
        """Write these values whatever the bucket holds: a rebuild's result replaces the old
        projection even where it is not newer (the fold itself may have changed)."""
        pending = list(conversations)
        for start in range(0, len(pending), _OVERWRITE_CHUNK):
            chunk = pending[start : start + _OVERWRITE_CHUNK]
            revisions = await asyncio.gather(
                *(self._kv.put(info.conversation_id, stored_value(info)) for info in chunk)
            )
            for info, revision in zip(chunk, revisions, strict=True):
                self._revisions[info.conversation_id] = revision

    async def _read(self, key: str) -> tuple[ConversationInfo | None, int]:
        """The current value and its revision; revision 0 means "no such key"."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError as error:
            # A deleted key leaves a tombstone whose revision the next write must name.
            tombstone = error.entry
            return None, tombstone.revision if tombstone is not None else 0
        assert entry.value is not None and entry.revision is not None
        return _decoder.decode(entry.value), entry.revision
