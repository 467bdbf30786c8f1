"""Dense, gap-free event ids per conversation with any number of concurrent writers.

Each append is an optimistic write: the event gets id = last id + 1 and is published with
`Nats-Expected-Last-Subject-Sequence` on the conversation's wildcard subject, so JetStream accepts
it only if nobody appended in between. A loser re-reads the tail and tries again. `Nats-Msg-Id`
= `<cid>:<id>` makes a retried publish (lost ack) idempotent.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.events import Event, encode_event

WRONG_LAST_SEQUENCE = 10071
# JetStream refused to store the message: with DiscardPolicy.NEW, the stream is at its limits.
STREAM_STORE_FAILED = 10077
_MAX_CACHED_CONVERSATIONS = 10_000

E = TypeVar("E", bound=Event)


class _Envelope(msgspec.Struct):
    id: int


class AppendConflict(RuntimeError):
    """Raised when an append keeps losing races (should not happen under sane contention)."""


class StreamFull(RuntimeError):
    """The event log is at its operator-set `max_bytes` (or message limit): nothing is appended,
    and nothing old is dropped, until the operator raises the limit or removes conversations."""


def raise_if_full(error: APIError, stream: str) -> None:
    """`StreamFull` for JetStream's "maximum bytes/messages exceeded" on `stream`."""
    if error.err_code == STREAM_STORE_FAILED and "maximum" in (error.description or ""):
        raise StreamFull(f"{stream} is full ({error.description})") from error


class EventAppender:
    """Appends events to TASKBUS_EVENTS; one instance per process, shared by its tasks."""

    def __init__(self, js: JetStreamContext, max_attempts: int = 200) -> None:
        self._js = js
        self._max_attempts = max_attempts
        # conversation_id -> (stream sequence, event id) of its last event, as last seen here.
        self._tails: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def append(self, event: E) -> E:
        """Append one event and return it with its assigned id."""
        (appended,) = await self.append_all([event])
        return appended

    async def append_all(self, events: Sequence[E]) -> list[E]:
        """Append several events of one conversation in order, with consecutive ids."""
        if not events:
            return []
        conversation_id = events[0].conversation_id
        if any(e.conversation_id != conversation_id for e in events):
            raise ValueError("append_all takes events of a single conversation")
        lock = self._locks.setdefault(conversation_id, asyncio.Lock())
        async with lock:
            return [await self._append_one(event) for event in events]

    async def _append_one(self, event: E) -> E:
        cid = event.conversation_id
        for _ in range(self._max_attempts):
            tail = self._tails.get(cid)
            if tail is None:
                tail = await self._read_tail(cid)
            last_seq, last_id = tail
            candidate = msgspec.structs.replace(event, id=last_id + 1)
            payload = encode_event(candidate)
            try:
                ack = await self._js.publish(
                    subjects.event_subject(cid, candidate.kind),
                    payload,
                    headers={
                        "Nats-Msg-Id": f"{cid}:{candidate.id}",
                        "Nats-Expected-Last-Subject-Sequence": str(last_seq),
                        "Nats-Expected-Last-Subject-Sequence-Subject": (
                            subjects.conversation_events(cid)
                        ),
                    },
                )
            except APIError as error:
                raise_if_full(error, subjects.EVENTS_STREAM)
                if error.err_code != WRONG_LAST_SEQUENCE:
                    raise
                self._tails.pop(cid, None)  # another writer won: re-read the tail
                continue
            if ack.duplicate and not await self._is_ours(ack.seq, payload):
                # The id was taken by another writer within the dedupe window.
                self._tails.pop(cid, None)
                continue
            self._remember(cid, ack.seq, candidate.id)
            return candidate
        raise AppendConflict(f"could not append to {cid} after {self._max_attempts} attempts")

    async def _read_tail(self, conversation_id: str) -> tuple[int, int]:
        try:
            message = await self._js.get_last_msg(
                subjects.EVENTS_STREAM, subjects.conversation_events(conversation_id), direct=True
            )
        except NotFoundError:
            return 0, -1
        assert message.seq is not None and message.data is not None
        return message.seq, msgspec.json.decode(message.data, type=_Envelope).id

    async def _is_ours(self, seq: int, payload: bytes) -> bool:
        stored = await self._js.get_msg(subjects.EVENTS_STREAM, seq, direct=True)
        return stored.data == payload

    def _remember(self, conversation_id: str, seq: int, event_id: int) -> None:
        self._tails[conversation_id] = (seq, event_id)
        self._tails.move_to_end(conversation_id)
        if len(self._tails) > _MAX_CACHED_CONVERSATIONS:
            evicted, _ = self._tails.popitem(last=False)
            lock = self._locks.get(evicted)
            if lock is not None and not lock.locked():
                del self._locks[evicted]
