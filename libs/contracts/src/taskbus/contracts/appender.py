"""Dense, gap-free event ids per conversation with any number of concurrent writers.

Each append is an optimistic write: the event gets id = last id + 1 and is published with
`Nats-Expected-Last-Subject-Sequence` on the conversation's wildcard subject, so JetStream accepts
it only if nobody appended in between. A loser re-reads the tail (from the stream leader: a
replica may lag) and tries again. `Nats-Msg-Id` = `<cid>:<hash of the event without its id>`
names the event, not the slot: a retry after an unclear answer (a lost ack, or a deposed leader's
"wrong last sequence" while the new one stored it) is deduplicated by JetStream and returns the
stored copy, instead of storing the event again under the next id. The partition test on a
three-node cluster (tests/cluster) caught the slot-named id doing exactly that. So the same
event, every field and its microsecond timestamp alike, appended again within the dedupe window
is stored once; two equal events in one `append_all` are both kept.

The common case is one round trip: the tail (sequence, id) of each conversation appended here
is cached, so an append publishes at once against the cached sequence and re-reads only after
losing a race. Appends of different conversations run side by side on one connection: their
publishes go out without waiting for each other's acks (one reply subscription for all, futures
keyed by reply subject), and the ack is decoded by msgspec. That lean publish, not nats-py's
`js.publish` (a request with `asyncio.wait_for` and a `json` decode per ack), is what keeps the
appender near raw publish speed (bench/hot_path.py).

`append_decision` is for a writer that decides from a folded state (session-manager): the
events are stored only if the log still ends where that state does, and all of them or none
(one JetStream atomic batch, nats-server 2.12+). A writer cut off between two appends of one
decision left a half the next reader could not complete (STARTING with no sandbox request), and
one deciding from a stale fold appended after events it never saw (re-admitting a FINISHED
conversation). An atomic batch costs the server a staging store (about 3 ms on a file stream
with one replica), so only a decision of several events pays it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.events import Event, encode_event
from taskbus.contracts.observability import trace_headers
from taskbus.contracts.observability_metrics import EVENTS_APPENDED
from taskbus.contracts.streams import read_batch

WRONG_LAST_SEQUENCE = 10071
# An atomic batch holds a message id already in the dedupe window.
BATCH_DUPLICATE_ID = 10201
# JetStream refused to store the message: with DiscardPolicy.NEW, the stream is at its limits.
STREAM_STORE_FAILED = 10077
_MAX_CACHED_CONVERSATIONS = 10_000

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

# Subjects of the conversations being appended to (the partition hash is pure Python).
_event_subject = functools.lru_cache(maxsize=4 * _MAX_CACHED_CONVERSATIONS)(subjects.event_subject)
_conversation_events = functools.lru_cache(maxsize=_MAX_CACHED_CONVERSATIONS)(
    subjects.conversation_events
)

# The counter's child per kind: `labels()` costs as much as hashing the event.
_appended = functools.lru_cache(maxsize=None)(EVENTS_APPENDED.labels)


class _Envelope(msgspec.Struct):
    id: int


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: a stored message's place, or an error."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class AppendConflict(RuntimeError):
    """Raised when an append keeps losing races (should not happen under sane contention)."""


class StaleAppend(RuntimeError):
    """The log of the conversation no longer ends at the event a decision was taken on:
    nothing was appended; the decision is to be taken again on the log as it is."""

    def __init__(self, conversation_id: str, after: int, last_id: int) -> None:
        super().__init__(f"{conversation_id} ends at event {last_id}, not {after}")
        self.conversation_id = conversation_id


class StreamFull(RuntimeError):
    """The event log is at its operator-set `max_bytes` (or message limit): nothing is appended,
    and nothing old is dropped, until the operator raises the limit or removes conversations."""


def is_unavailable(error: Exception) -> bool:
    """Whether an append failed only because the log could not take it now (nats-server down,
    restarting or without a JetStream leader, or the stream full): the same append may succeed
    later, and its `Nats-Msg-Id` makes a retry of an unclear one store it once."""
    if isinstance(error, APIError) and not isinstance(error, NotFoundError):
        return error.code == 503  # JetStream temporarily unavailable
    return isinstance(
        error,
        (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError,
            NoStreamResponseError,
            StreamFull,
        ),
    )


def raise_if_full(error: APIError, stream: str) -> None:
    """`StreamFull` for JetStream's "maximum bytes/messages exceeded" on `stream`."""
    if error.err_code == STREAM_STORE_FAILED and "maximum" in (error.description or ""):
        raise StreamFull(f"{stream} is full ({error.description})") from error


def identities(events: Sequence[Event]) -> list[str]:
    """Each event's name for JetStream's deduplication: a hash of it without its id (which a
    retry may change), numbered when one batch holds the same event twice, so both are kept."""
    seen: dict[str, int] = {}
    names = []
    for event in events:
        digest = hashlib.sha256(encode_event(msgspec.structs.replace(event, id=-1))).hexdigest()
        seen[digest] = seen.get(digest, 0) + 1
        names.append(digest[:32] if seen[digest] == 1 else f"{digest[:32]}.{seen[digest]}")
    return names


class EventAppender:
    """Appends events to TASKBUS_EVENTS; one instance per process, shared by its tasks."""

    def __init__(self, js: JetStreamContext, max_attempts: int = 200) -> None:
        self._js = js
        # nats-py's JetStreamContext exposes neither its connection nor its timeout: the lean
        # publish below needs both, and takes them from there so every caller's `js` (its
        # connection, its timeout) keeps meaning what it did.
        self._nc: Client = js._nc
        self._timeout: float = js._timeout
        self._max_attempts = max_attempts
        # conversation_id -> (stream sequence, event id) of its last event, as last seen here.
        self._tails: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._replies: Subscription | None = None
        self._reply_prefix = ""
        self._reply_numbers = itertools.count()
        self._subscribing = asyncio.Lock()

    async def append(self, event: E) -> E:
        """Append one event and return it with its assigned id."""
        (appended,) = await self.append_all([event])
        return appended

    async def append_until_stored(self, event: E, *, max_pause: float = 5.0) -> E:
        """Append the record of something already done (an action's outcome): while the log is
        unavailable (`is_unavailable`) it is tried again, pausing up to `max_pause` seconds
        between tries, for as long as the caller waits. A failed append must not make the
        caller do the thing again to get a record of it."""
        pause = 0.1
        while True:
            try:
                return await self.append(event)
            except Exception as error:
                if not is_unavailable(error):
                    raise
                log.warning(
                    "appending %s to %s: %r; trying again in %.1f s",
                    event.kind,
                    event.conversation_id,
                    error,
                    pause,
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, max_pause)

    async def append_all(self, events: Sequence[E]) -> list[E]:
        """Append several events of one conversation in order, with consecutive ids (one by
        one: another writer's may come between them)."""
        async with self._lock_of(events):
            return [
                await self._append_one(event, identity)
                for event, identity in zip(events, identities(events), strict=True)
            ]

    async def append_decision(self, events: Sequence[E], after: int) -> list[E]:
        """Append what one decision on the conversation's state up to event id `after` (-1: an
        empty log) chose: all of them, right after that event, or nothing (`StaleAppend`)."""
        async with self._lock_of(events):
            if len(events) == 1:
                return [await self._append_one(events[0], identities(events)[0], after)]
            return await self._append_batch(events, after)

    def saw(self, conversation_id: str, last: RawStreamMsg) -> None:
        """Take note of the conversation's last event as another reader got it from the log
        (the runner's reply check reads it before an action runs): later than the tail cached
        here, it becomes the tail, so the answer is placed right after it at once instead of
        first failing on a tail this appender had not seen. The log's own message, not a
        sequence someone passed on: nothing but the log decides where an event goes."""
        assert last.seq is not None and last.data is not None
        cached = self._tails.get(conversation_id)
        if cached is None or cached[0] < last.seq:
            event_id = msgspec.json.decode(last.data, type=_Envelope).id
            self._remember(conversation_id, last.seq, event_id)

    def _lock_of(self, events: Sequence[Event]) -> asyncio.Lock:
        if not events:
            return asyncio.Lock()
        conversation_id = events[0].conversation_id
        if any(e.conversation_id != conversation_id for e in events):
            raise ValueError("an append takes events of a single conversation")
        return self._locks.setdefault(conversation_id, asyncio.Lock())

    async def _tail(self, cid: str, from_leader: bool, after: int | None) -> tuple[int, int]:
        """The conversation's (sequence, id) of its last event: the cached one, else read. The
        append is called stale only on the leader's word: a cached tail or a replica's copy
        that is not `after` may just be behind."""
        cached = self._tails.get(cid)
        if cached is not None and (after is None or cached[1] == after):
            return cached
        leader = from_leader or cached is not None
        tail = await self._read_tail(cid, leader)
        if after is not None and tail[1] != after:
            if not leader:
                tail = await self._read_tail(cid, True)
            if tail[1] != after:
                raise StaleAppend(cid, after, tail[1])
        return tail

    async def _append_one(self, event: E, identity: str, after: int | None = None) -> E:
        cid = event.conversation_id
        from_leader = False
        for _ in range(self._max_attempts):
            last_seq, last_id = await self._tail(cid, from_leader, after)
            from_leader = True  # if a read was stale, the next is the leader's
            candidate = msgspec.structs.replace(event, id=last_id + 1)
            payload = encode_event(candidate)
            try:
                ack = await self._publish(
                    _event_subject(cid, candidate.kind),
                    payload,
                    _headers(cid, identity, expected_seq=last_seq),
                )
            except APIError as error:
                raise_if_full(error, subjects.EVENTS_STREAM)
                if error.err_code != WRONG_LAST_SEQUENCE:
                    raise
                self._tails.pop(cid, None)  # another writer won: re-read the tail
                continue
            if ack.duplicate:
                # Stored before, maybe under another id: that copy is the append. (A stale
                # leader may answer "duplicate" with a sequence it never committed: retry.)
                self._tails.pop(cid, None)
                stored = await self._stored(ack.seq, event)
                if stored is None:
                    continue
                return stored
            self._remember(cid, ack.seq, candidate.id)
            _appended(candidate.kind).inc()
            return candidate
        raise AppendConflict(f"could not append to {cid} after {self._max_attempts} attempts")

    async def _append_batch(self, events: Sequence[E], after: int) -> list[E]:
        """`events` in one atomic batch right after event `after`. A batch the server refuses
        as a duplicate, or on a moved tail, may be this one stored by an earlier try whose
        answer was lost (a deposed leader's "wrong last sequence"): it is looked for where it
        would be before the tail is read again."""
        cid = events[0].conversation_id
        names = identities(events)
        from_leader = False
        for _ in range(self._max_attempts):
            last_seq, last_id = await self._tail(cid, from_leader, after)
            from_leader = True
            candidates = [
                msgspec.structs.replace(event, id=last_id + 1 + n) for n, event in enumerate(events)
            ]
            messages = _batch(cid, candidates, names, expected_seq=last_seq)
            try:
                ack = await self._publish(*messages[-1], before=messages[:-1])
            except APIError as error:
                raise_if_full(error, subjects.EVENTS_STREAM)
                if error.err_code not in (WRONG_LAST_SEQUENCE, BATCH_DUPLICATE_ID):
                    raise
                self._tails.pop(cid, None)
                stored = await self._stored_run(cid, last_seq, events)
                if stored is not None:
                    return stored
                if error.err_code == BATCH_DUPLICATE_ID:
                    raise AppendConflict(f"{cid}: a batch of events stored before") from error
                continue
            self._remember(cid, ack.seq, candidates[-1].id)
            for candidate in candidates:
                _appended(candidate.kind).inc()
            return candidates
        raise AppendConflict(f"could not append to {cid} after {self._max_attempts} attempts")

    async def _stored_run(self, cid: str, after_seq: int, events: Sequence[E]) -> list[E] | None:
        """The stored copies of `events` if they are the conversation's events right after
        stream sequence `after_seq`, else None."""
        page, _ = await read_batch(self._js, _conversation_events(cid), after_seq + 1, len(events))
        if len(page) != len(events):
            return None
        copies = []
        for (_, data), event in zip(page, events, strict=True):
            copy = _copy_of(data, event)
            if copy is None:
                return None
            copies.append(copy)
        return copies

    async def _publish(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        before: Sequence[tuple[str, bytes, dict[str, str]]] = (),
    ) -> _PubAck:
        """Publish to JetStream and wait for its ack, raising as `js.publish` does (APIError,
        NoStreamResponseError, nats.errors.TimeoutError). The messages `before` it (the start
        of an atomic batch) go out first, unanswered: the server acks the whole batch."""
        if self._replies is None:
            await self._subscribe_replies()
        reply = f"{self._reply_prefix}{next(self._reply_numbers)}"
        answered: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._acks[reply] = answered
        timer = asyncio.get_running_loop().call_later(
            self._timeout, _time_out, answered, self._timeout
        )
        try:
            for message in before:
                await self._nc.publish(message[0], message[1], headers=message[2])
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
            msg = await answered
        finally:
            timer.cancel()
            self._acks.pop(reply, None)
        if msg.headers and msg.headers.get("Status") == "503":
            raise NoStreamResponseError
        ack = _ack_decoder.decode(msg.data)
        if ack.error is not None:
            APIError.from_error(ack.error)  # raises the error's own class, as js.publish does
        return ack

    async def _subscribe_replies(self) -> None:
        """One subscription on this connection's inboxes takes the acks of every append."""
        async with self._subscribing:
            if self._replies is None:
                prefix = f"{self._nc.new_inbox()}."
                self._replies = await self._nc.subscribe(f"{prefix}*", cb=self._on_reply)
                self._reply_prefix = prefix

    async def _on_reply(self, msg: Msg) -> None:
        answered = self._acks.get(msg.subject)
        if answered is not None and not answered.done():
            answered.set_result(msg)

    async def _read_tail(self, conversation_id: str, from_leader: bool) -> tuple[int, int]:
        try:
            message = await self._js.get_last_msg(
                subjects.EVENTS_STREAM,
                _conversation_events(conversation_id),
                direct=not from_leader,
            )
        except NotFoundError:
            return 0, -1
        assert message.seq is not None and message.data is not None
        return message.seq, msgspec.json.decode(message.data, type=_Envelope).id

    async def _stored(self, seq: int, event: E) -> E | None:
        """The stored copy of `event` at `seq`, or None if `seq` holds another event. Read from
        the stream leader: a direct get may be answered by a lagging or just-rejoined replica
        that does not have it yet."""
        try:
            stored = await self._js.get_msg(subjects.EVENTS_STREAM, seq)
        except NotFoundError:
            return None
        assert stored.data is not None
        return _copy_of(stored.data, event)

    def _remember(self, conversation_id: str, seq: int, event_id: int) -> None:
        self._tails[conversation_id] = (seq, event_id)
        self._tails.move_to_end(conversation_id)
        if len(self._tails) > _MAX_CACHED_CONVERSATIONS:
            evicted, _ = self._tails.popitem(last=False)
            lock = self._locks.get(evicted)
            if lock is not None and not lock.locked():
                del self._locks[evicted]


def _headers(
    cid: str, identity: str, *, expected_seq: int | None, batch: dict[str, str] | None = None
) -> dict[str, str]:
    """An event's headers: its dedupe name, the conversation's expected last sequence (on a
    batch's first message only), its place in an atomic batch, and the trace context (the
    event's consumers continue this trace)."""
    headers = {"Nats-Msg-Id": f"{cid}:{identity}", **(batch or {})}
    if expected_seq is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_seq)
        headers["Nats-Expected-Last-Subject-Sequence-Subject"] = _conversation_events(cid)
    return trace_headers(headers)


def _batch(
    cid: str, events: Sequence[Event], names: Sequence[str], *, expected_seq: int
) -> list[tuple[str, bytes, dict[str, str]]]:
    """The messages of one atomic batch of `events` (ids given), the last one committing."""
    batch_id = uuid.uuid4().hex
    messages = []
    for number, (event, identity) in enumerate(zip(events, names, strict=True), 1):
        batch = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(number)}
        if number == len(events):
            batch["Nats-Batch-Commit"] = "1"
        headers = _headers(
            cid, identity, expected_seq=expected_seq if number == 1 else None, batch=batch
        )
        messages.append((_event_subject(cid, event.kind), encode_event(event), headers))
    return messages


def _copy_of(data: bytes, event: E) -> E | None:
    """The stored event `data` if it is `event` (whatever id each was given), else None."""
    try:
        copy = msgspec.json.decode(data, type=type(event))
    except msgspec.ValidationError:  # another kind of event
        return None
    same = msgspec.structs.replace(copy, id=-1) == msgspec.structs.replace(event, id=-1)
    return copy if same else None


def _time_out(answered: asyncio.Future[Msg], timeout: float) -> None:
    if not answered.done():
        answered.set_exception(nats.errors.TimeoutError(f"no ack within {timeout} s"))
