"""The folded state of each conversation session-manager holds in memory."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType

import msgspec
from nats.js import JetStreamContext

from taskbus.contracts.events import AnyEvent, ConversationDeleted, Event, UnknownEvent
from taskbus.session_manager import snapshots
from taskbus.session_manager.settings import SNAPSHOT_EVERY_EVENTS
from taskbus.session_manager.snapshots import SnapshotStore
from taskbus.session_manager.state import ConversationState, apply

logger = logging.getLogger(__name__)

OnChange = Callable[[ConversationState], None]
# Appends the events decided on a conversation's state up to the event id given (its
# `last_event_id`), returning once the state includes them (the appended events, with their
# ids, for a caller that needs them); `StaleAppend` if the log had moved on (the state is then
# folded again: decide anew).
Append = Callable[[Sequence[Event], int], Awaitable[object]]


class Conversations:
    """A cache of `fold(log)` per conversation, out of `SessionManager` so that class keeps one
    job less and the fold stays pure: it folds a conversation from the log on a miss, applies
    each event in order (refolding after a gap), forgets a state nobody uses, and calls
    `on_change(state)` whenever a conversation's state changes beyond its log position.

    A load reads the conversation's snapshot and the log after it (`snapshots`); a snapshot is
    written once `snapshot_every` events have come since the last, when the state is exactly
    the fold up to an event whose stream sequence is known (one the consumer delivered), or
    after a load that read that many."""

    def __init__(
        self,
        js: JetStreamContext,
        on_change: OnChange,
        *,
        snapshot_every: int = SNAPSHOT_EVERY_EVENTS,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self._js = js
        self._on_change = on_change
        self._snapshot_every = snapshot_every
        self._snapshots = snapshots or SnapshotStore(js)
        # The last event id of each held conversation's latest snapshot (read or written).
        self._snapshot_ids: dict[str, int] = {}
        self._states: dict[str, ConversationState] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._loading: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.states: Mapping[str, ConversationState] = MappingProxyType(self._states)
        """A live read-only view of the states held."""

    def __getitem__(self, conversation_id: str) -> ConversationState:
        return self._states[conversation_id]

    async def load(self, conversation_id: str) -> ConversationState:
        """The conversation's state, rebuilt from the log the first time it is needed."""
        async with self._loading[conversation_id]:
            state = self._states.get(conversation_id)
            if state is None:
                loaded = await snapshots.load(self._js, self._snapshots, conversation_id)
                self._snapshot_ids[conversation_id] = loaded.snapshot_id
                if loaded.sequence is not None:
                    await self._snapshot(loaded.state, loaded.sequence)
                self._advance(loaded.state)
                state = self._states[conversation_id]
            return state

    async def observe(self, event: AnyEvent | UnknownEvent, sequence: int | None = None) -> None:
        """Apply an event read from the log (at stream `sequence`): the next one is applied, a
        later one means some were missed (the state is folded again), an earlier one is
        already in. A deletion purges the snapshot, also when delivered again."""
        cid = event.conversation_id
        if isinstance(event, ConversationDeleted):
            await self._snapshots.purge(cid)
        await self._apply_observed(event)
        state = self._states.get(cid)
        if sequence is not None and state is not None and state.last_event_id == event.id:
            await self._snapshot(state, sequence)

    async def _apply_observed(self, event: AnyEvent | UnknownEvent) -> None:
        cid = event.conversation_id
        state = self._states.get(cid)
        if state is None:
            if event.id == 0:
                self._advance(apply(ConversationState(conversation_id=cid), event))
            else:
                await self.load(cid)
        elif event.id == state.last_event_id + 1:
            self._advance(apply(state, event))
        elif event.id > state.last_event_id + 1:
            self._states.pop(cid)  # missed events: rebuild from the log
            await self.load(cid)

    async def include(self, appended: Sequence[Event]) -> None:
        """Apply events just appended to one conversation (with their ids), and return once its
        state includes them, if need be through `observe`. A new conversation's first events
        are folded as they are: reading back a log just written costs a create round trips."""
        cid = appended[0].conversation_id
        state = self._states.get(cid)
        if state is None:
            if appended[0].id != 0:  # dropped meanwhile (an unclear append): the log has them
                await self.load(cid)
                return
            # A new conversation (a create): what was appended is all of its log so far.
            state = ConversationState(conversation_id=cid)
        for event in appended:
            if event.id == state.last_event_id + 1:
                state = apply(state, event)
        self._advance(state)
        while self._states[cid].last_event_id < appended[-1].id:
            waiter = self._changed.setdefault(cid, asyncio.Event())
            await asyncio.wait_for(waiter.wait(), timeout=30)

    async def refold(self, conversation_id: str) -> ConversationState:
        """The conversation's state folded again from the log, for one found to be behind it
        (or that may be). If the log cannot be read, the state is gone: `load` reads it."""
        async with self._loading[conversation_id]:
            self._states.pop(conversation_id, None)
        return await self.load(conversation_id)

    def forget(self, conversation_id: str, *, in_use: bool) -> bool:
        """Drop a conversation's state unless it is `in_use` by the caller or being loaded or
        waited for here; `load` folds it from the log again when it is needed. True if
        dropped."""
        if in_use or conversation_id in self._changed or self._loading[conversation_id].locked():
            return False
        del self._states[conversation_id]
        self._loading.pop(conversation_id, None)
        self._snapshot_ids.pop(conversation_id, None)
        return True

    async def _snapshot(self, state: ConversationState, sequence: int) -> None:
        """Store `state` (the fold up to the event at stream `sequence`) if `snapshot_every`
        events have come since the last snapshot. A failed write only leaves a longer tail."""
        cid = state.conversation_id
        if state.deleted or state.last_event_id - self._snapshot_ids.get(cid, -1) < (
            self._snapshot_every
        ):
            return
        self._snapshot_ids[cid] = state.last_event_id
        try:
            await self._snapshots.put(state, sequence)
        except Exception:
            logger.exception("snapshot of %s not stored", cid)

    def _advance(self, state: ConversationState) -> None:
        """Keep the newer of two states of a conversation (both are folds of a log prefix)."""
        current = self._states.get(state.conversation_id)
        if current is not None and current.last_event_id >= state.last_event_id:
            return
        self._states[state.conversation_id] = state
        waiter = self._changed.pop(state.conversation_id, None)
        if waiter is not None:
            waiter.set()
        if current is None or moved(current, state):
            self._on_change(state)


def moved(before: ConversationState, after: ConversationState) -> bool:
    """Whether `after` differs from `before` in more than its log position (an event that
    changes nothing, e.g. a `ResourceUsage`, gives the driver nothing new to decide on)."""
    return msgspec.structs.replace(before, last_event_id=after.last_event_id) != after
