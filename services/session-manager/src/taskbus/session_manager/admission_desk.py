"""The admission desk: applies `admission`'s pure decisions to the conversations in memory."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

from taskbus.contracts.appender import StaleAppend
from taskbus.contracts.events import Event
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.session_manager import admission
from taskbus.session_manager.admission_ledger import (
    AdmissionLedger,
    Ledger,
    Slot,
    stale_entries,
)
from taskbus.session_manager.conversations import Append
from taskbus.session_manager.decide import Step, next_step, start_events, status_event
from taskbus.session_manager.dependencies import WAITING_FOR_DEPENDENCIES, unresolved
from taskbus.session_manager.lifecycle import stop_events
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.state import ConversationState, holds_slot

logger = logging.getLogger(__name__)

SettingsOf = Callable[[str], Awaitable[UserSettings | None]]

_LONG_AGO = datetime.min.replace(tzinfo=UTC)
_EVICTED_ONLY_BY_ITS_OWNER = sys.maxsize


def _now() -> datetime:
    return datetime.now(UTC)


class AdmissionDesk:
    """Admission's effects, out of `SessionManager` so that class keeps one job less (one job
    per class; effects kept thin around the pure decisions of `admission`). The desk owns the
    admission lock, gathers the facts a decision needs (who holds a slot, who waits, each
    user's limits) from the states the service holds, and appends what was decided through the
    service's `append`. Every decision is taken under the lock, so two never count the same
    free slot."""

    def __init__(
        self,
        settings: SessionManagerSettings,
        states: Mapping[str, ConversationState],
        settings_of: SettingsOf,
        append: Append,
        ledger: AdmissionLedger,
        holds: Callable[[str], bool] = lambda _: True,
    ) -> None:
        """`states` is the live view of the conversation cache (read, never written), of which
        this instance `holds` some partitions' conversations (the others may be cached as
        dependencies, never admitted or counted here); `append` returns once the states include
        the appended events."""
        self._settings = settings
        self._ledger = ledger
        self._holds = holds
        self._states = states
        self._settings_of = settings_of
        self._append = append
        # Held by every admission decision: `start_or_queue`'s callers take it.
        self.lock = asyncio.Lock()

    async def start_or_queue(
        self, state: ConversationState, prefix: list[Event], *, new: bool = False
    ) -> admission.Reject | None:
        """Admit `state` now (evicting if the policy says so) or queue it, appending `prefix`
        first. Lock held. A `new` one (created or restarted, not yet waiting) that would wait
        beyond the user's queue limit is refused: nothing is appended and the refusal is
        returned. One whose dependencies have not ended waits for them (`DependencyDesk`)."""
        limits = await self._limits_of(state.user_id)
        cid = state.conversation_id

        def choose(
            ledger: Ledger,
        ) -> tuple[Ledger, admission.Admit | admission.Queue | admission.Reject]:
            decision = self._decide(state, ledger, limits, new=new)
            if isinstance(decision, admission.Reject):
                return ledger, decision
            slot = Slot(user_id=state.user_id, priority=state.spec.priority, since=_now())
            if isinstance(decision, admission.Queue):
                return ledger.waiting(cid, ledger.queued.get(cid, slot)), decision
            return ledger.admitted(cid, slot, decision.evict), decision

        _, decision = await self._ledger.decide(choose)
        if isinstance(decision, admission.Reject):
            logger.info("%s refused: %s", cid, decision.reason)
            return decision
        events = [*prefix]
        if isinstance(decision, admission.Queue):
            if state.status != ConversationStatus.QUEUED:
                events.append(status_event(state, ConversationStatus.QUEUED, decision.reason))
        else:
            await self._evict(decision.evict)
            events += start_events(state)
        try:  # `state` includes `prefix`: the log is to end where it did before them
            await self._append(events, state.last_event_id - len(prefix))
        except StaleAppend:
            await self._settle_refolded(cid)
            raise
        return None

    def _decide(
        self,
        state: ConversationState,
        ledger: Ledger,
        limits: admission.UserLimits,
        *,
        new: bool,
    ) -> admission.Admit | admission.Queue | admission.Reject:
        running = self._running(ledger)
        priority = state.spec.priority
        max_running = self._settings.max_running
        # Waiting already, it does not count against its own place in the queue.
        queued = ledger.queued_count(state.user_id) - (state.conversation_id in ledger.queued)
        if unresolved(state):
            decision: admission.Admit | admission.Queue = admission.Queue(
                reason=WAITING_FOR_DEPENDENCIES
            )
            return admission.queue_limited(decision, queued, limits) if new else decision
        if new:
            return admission.admit_new(
                state.user_id, running, queued, limits, max_running, priority
            )
        return admission.admit(state.user_id, running, limits, max_running, priority)

    async def restart(self, conversation_id: str) -> admission.Reject | None:
        """Admit a stopped conversation again, as a new one: refused if the queue is full."""
        async with self.lock:
            return await self.start_or_queue(self._states[conversation_id], [], new=True)

    async def readmit(self, conversation_id: str) -> None:
        """Give a conversation that needs a sandbox again (`Step.READMIT`) one, or queue it."""
        async with self.lock:
            state = self._states[conversation_id]
            if next_step(state) is Step.READMIT:
                await self.start_or_queue(state, [])

    async def admit_waiting(self) -> None:
        """Start the queued conversations of the partitions held here that fit now, in queue
        order (another instance starts its own)."""
        async with self.lock:
            waiting = [
                admission.Waiting(
                    conversation_id=s.conversation_id,
                    user_id=s.user_id,
                    priority=s.spec.priority,
                    since=s.status_since or _LONG_AGO,
                )
                for s in self._states.values()
                # The cheap test first: every conversation in memory is looked at, most are
                # not queued, and which partition one is in takes hashing its id.
                if s.status == ConversationStatus.QUEUED
                and not s.deleted
                and self._holds(s.conversation_id)
                and not unresolved(s)
            ]
            if not waiting:
                return
            limits = {w.user_id: await self._limits_of(w.user_id) for w in waiting}

            def choose(
                ledger: Ledger,
            ) -> tuple[Ledger, list[tuple[admission.Waiting, admission.Admit]]]:
                admitted = admission.admit_waiting(
                    waiting,
                    self._running(ledger),
                    limits.__getitem__,
                    self._settings.max_running,
                    _now(),
                )
                changed = ledger
                for candidate, decision in admitted:
                    slot = Slot(
                        user_id=candidate.user_id, priority=candidate.priority, since=_now()
                    )
                    changed = changed.admitted(candidate.conversation_id, slot, decision.evict)
                return changed, admitted

            _, admitted = await self._ledger.decide(choose)
            for candidate, decision in admitted:
                await self._evict(decision.evict)
                state = self._states[candidate.conversation_id]
                try:
                    await self._append(start_events(state), state.last_event_id)
                except StaleAppend:  # it had moved on (e.g. ended) while this state lagged
                    await self._settle_refolded(candidate.conversation_id)

    async def _settle_refolded(self, conversation_id: str) -> None:
        """Make the ledger follow the log again after an admission appended nothing: the
        conversation's state was found behind the log and folded again."""
        state = self._states.get(conversation_id)
        if state is not None:
            await self.settle(state)

    async def settle(self, *states: ConversationState) -> None:
        """Make the ledger say what the log says of conversations held here (in one write):
        holding a slot, waiting, or neither (ended, stopped, deleted): a slot one frees is
        then anyone's."""
        now = _now()

        def follow(ledger: Ledger) -> Ledger:
            for state in states:
                cid = state.conversation_id
                slot = Slot(user_id=state.user_id, priority=state.spec.priority, since=now)
                if holds_slot(state):
                    if cid not in ledger.running:
                        ledger = ledger.admitted(cid, slot, ())
                elif state.status == ConversationStatus.QUEUED and not state.deleted:
                    if cid not in ledger.queued:
                        ledger = ledger.waiting(cid, slot)
                else:
                    ledger = ledger.without([cid])
            return ledger

        await self._ledger.change(follow)

    async def repair(self) -> None:
        """Drop the entries the log of a held conversation contradicts (an instance stopped
        between its ledger write and its append), once past the grace of an admission in
        flight."""
        ledger, _ = await self._ledger.read()

        def known(check: Callable[[ConversationState], bool]) -> Callable[[str], bool | None]:
            def answer(cid: str) -> bool | None:
                state = self._states.get(cid)
                return None if state is None else check(state)

            return answer

        stale = stale_entries(
            ledger,
            owned=self._holds,
            holds_slot=known(holds_slot),
            waits=known(lambda s: s.status == ConversationStatus.QUEUED and not s.deleted),
            now=_now(),
        )
        if stale:
            logger.warning("admission ledger: dropping entries the log contradicts: %s", stale)
            await self._ledger.change(lambda current: current.without(stale))

    async def _limits_of(self, user_id: str) -> admission.UserLimits:
        return admission.user_limits(await self._settings_of(user_id), self._settings)

    def _running(self, ledger: Ledger) -> list[admission.Running]:
        """Every conversation holding a slot, from the ledger. One this instance does not
        hold counts at a priority nothing outranks: its own instance alone may evict it."""
        running = []
        for cid, slot in ledger.running.items():
            state = self._states.get(cid) if self._holds(cid) else None
            running.append(
                admission.Running(
                    conversation_id=cid,
                    user_id=slot.user_id,
                    last_activity=(state.last_activity if state else None) or slot.since,
                    priority=slot.priority if state is not None else _EVICTED_ONLY_BY_ITS_OWNER,
                )
            )
        return running

    async def _evict(self, conversation_ids: Sequence[str]) -> None:
        for cid in conversation_ids:
            logger.info("evicting %s: its user has too many conversations", cid)
            state = self._states[cid]
            await self._append(stop_events(state, admission.EVICTION_REASON), state.last_event_id)
