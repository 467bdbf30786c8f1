"""Snapshots of folded conversation states, so loading a conversation costs a snapshot and the
log's tail rather than its whole log.

A snapshot (KV `taskbus_snapshots`, key = conversation id, written by session-manager alone) is
a state `fold` gave for the log up to one event, with that event's stream sequence. It is a
cache and the log stays the truth: a load uses it only if the log holds, at that sequence, that
conversation's event with the snapshot's `last_event_id` (then ids being dense, the events after
it are exactly what the snapshot lacks); otherwise, or if it is undecodable or of another
`FORMAT` (another fold version or state shape), the whole log is folded. So an old, corrupt or
foreign snapshot costs time, never correctness, and a partition's new holder may use what the
old one wrote: both fold the same log. Two writers may race; either value is a valid fold.

Snapshots go with msgpack (msgspec); one over the connection's max_payload is not written (the
previous one stays, with a longer tail). A deleted conversation's snapshot is purged with it.
"""

from __future__ import annotations

import hashlib
import logging
import types
import typing
from typing import Any

import msgspec
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.events import AnyEvent, Event
from taskbus.session_manager import log
from taskbus.session_manager.state import (
    FOLD_VERSION,
    ConversationState,
    History,
    apply,
    fold,
)

logger = logging.getLogger(__name__)


def _storable(annotation: Any) -> Any:
    """A field's type with every `Event` (a base class, which would decode as itself) as the
    union of the concrete kinds, and the history as a tuple of them."""
    if annotation is History:
        return tuple[AnyEvent, ...]
    if annotation is Event:
        return AnyEvent
    if isinstance(annotation, types.UnionType) and Event in typing.get_args(annotation):
        return typing.Union[tuple(_storable(a) for a in typing.get_args(annotation))]  # noqa: UP007
    return annotation


def _field(info: msgspec.structs.FieldInfo) -> tuple[str, Any] | tuple[str, Any, Any]:
    stored = _storable(info.type)
    if info.required:
        return (info.name, stored)
    if info.type is History:
        return (info.name, stored, ())
    if info.default_factory is not msgspec.NODEFAULT:
        return (info.name, stored, msgspec.field(default_factory=info.default_factory))
    return (info.name, stored, info.default)


# ConversationState as it is stored: the same fields, derived so that the two never drift.
_StoredState = msgspec.defstruct(
    "StoredState",
    [_field(info) for info in msgspec.structs.fields(ConversationState)],
    kw_only=True,
    frozen=True,
)
_FIELDS = tuple(info.name for info in msgspec.structs.fields(ConversationState))

# Snapshots of another format are ignored: the fold's version and the stored shape's digest,
# so a changed field or event type retires old snapshots without anyone having to remember.
FORMAT = (
    f"{FOLD_VERSION}."
    f"{hashlib.sha256(msgspec.json.encode(msgspec.json.schema(_StoredState))).hexdigest()[:16]}"
)


class _Header(msgspec.Struct, kw_only=True):
    format: str


# (format, the stream sequence of the event `state.last_event_id`, the state)
_Snapshot = msgspec.defstruct(
    "Snapshot", [("format", str), ("sequence", int), ("state", _StoredState)], kw_only=True
)


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(_Header)
_decoder = msgspec.msgpack.Decoder(_Snapshot)


def encode_snapshot(state: ConversationState, sequence: int) -> bytes:
    fields = {name: getattr(state, name) for name in _FIELDS}
    fields["history"] = tuple(state.history)
    return _encoder.encode(
        _Snapshot(format=FORMAT, sequence=sequence, state=_StoredState(**fields))
    )


def decode_snapshot(data: bytes) -> tuple[ConversationState, int] | None:
    """(state, the stream sequence of its last event), or None for anything else."""
    try:
        if _header_decoder.decode(data).format != FORMAT:
            return None
        snapshot: Any = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    fields = {name: getattr(snapshot.state, name) for name in _FIELDS}
    fields["history"] = History(fields["history"])
    return ConversationState(**fields), snapshot.sequence


class SnapshotStore(log.Bucket):
    def __init__(self, js: JetStreamContext, bucket: str = subjects.SNAPSHOTS_BUCKET) -> None:
        super().__init__(js, bucket)

    async def get(self, conversation_id: str) -> tuple[ConversationState, int] | None:
        value = await self._value(conversation_id)
        if value is None:
            return None
        found = decode_snapshot(value)
        if found is None or found[0].conversation_id != conversation_id:
            logger.info("ignoring an outdated or undecodable snapshot of %s", conversation_id)
            return None
        return found

    async def put(self, state: ConversationState, sequence: int) -> None:
        try:
            await (await self._bucket()).put(
                state.conversation_id, encode_snapshot(state, sequence)
            )
        except MaxPayloadError:
            logger.info("the snapshot of %s is too large to store", state.conversation_id)

    async def purge(self, conversation_id: str) -> None:
        """Remove every revision of the conversation's snapshot (its deletion)."""
        await (await self._bucket()).purge(conversation_id)


class Loaded(msgspec.Struct, frozen=True, kw_only=True):
    state: ConversationState
    sequence: int | None  # the stream sequence of its last event (None: no event)
    read: int  # events read from the log
    snapshot_id: int = -1  # the last event id of the snapshot it started from (-1: none)


async def load(js: JetStreamContext, store: SnapshotStore, conversation_id: str) -> Loaded:
    """The conversation's state as the log holds it now: its snapshot (if one matches the log)
    and the events after it, or the whole log folded. Two requests either way: the snapshot
    (or its absence) and one batch read of the log from there."""
    found = await store.get(conversation_id)
    if found is not None:
        snapshot, start = found
        tail = await log.read_events(js, conversation_id, start)
        if tail and tail[0][0] == start and tail[0][1].id == snapshot.last_event_id:
            state = snapshot
            for _, event in tail[1:]:
                state = apply(state, event)
            return Loaded(
                state=state,
                sequence=tail[-1][0],
                read=len(tail),
                snapshot_id=snapshot.last_event_id,
            )
        logger.info("the snapshot of %s does not match the log: folding it", conversation_id)
    events = await log.read_events(js, conversation_id)
    state = fold(conversation_id, (event for _, event in events))
    return Loaded(state=state, sequence=events[-1][0] if events else None, read=len(events))
