"""The admission desk: applies `admission`'s pure decisions to the conversations in memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

from taskbus.contracts.events import Event
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.session_manager import admission
from taskbus.session_manager.decide import Step, next_step, start_events, status_event
from taskbus.session_manager.dependencies import WAITING_FOR_DEPENDENCIES, unresolved
from taskbus.session_manager.lifecycle import stop_events
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.state import ConversationState, holds_slot

logger = logging.getLogger(__name__)

Append = Callable[[Sequence[Event]], Awaitable[None]]
SettingsOf = Callable[[str], Awaitable[UserSettings | None]]

_LONG_AGO = datetime.min.replace(tzinfo=UTC)


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
        holds: Callable[[str], bool] = lambda _: True,
    ) -> None:
        """`states` is the live view of the conversation cache (read, never written), of which
        this instance `holds` some partitions' conversations (the others may be cached as
        dependencies, never admitted or counted here); `append` returns once the states include
        the appended events."""
        self._settings = settings
        self._holds = holds
        self._states = states
        self._settings_of = settings_of
        self._append = append
        # Held by every admission decision, and by a caller that checks more (the service's
        # create) before `start_or_queue`.
        self.lock = asyncio.Lock()

    async def start_or_queue(
        self, state: ConversationState, prefix: list[Event], *, new: bool = False
    ) -> admission.Reject | None:
        """Admit `state` now (evicting if the policy says so) or queue it, appending `prefix`
        first. Lock held. A `new` one (created or restarted, not yet waiting) that would wait
        beyond the user's queue limit is refused: nothing is appended and the refusal is
        returned. One whose dependencies have not ended waits for them (`DependencyDesk`)."""
        limits = await self._limits_of(state.user_id)
        running = self._running()
        priority = state.spec.priority
        max_running = self._settings.max_running
        decision: admission.Admit | admission.Queue | admission.Reject
        if unresolved(state):
            decision = admission.Queue(reason=WAITING_FOR_DEPENDENCIES)
            if new:
                decision = admission.queue_limited(decision, self._queued(state.user_id), limits)
        elif new:
            decision = admission.admit_new(
                state.user_id, running, self._queued(state.user_id), limits, max_running, priority
            )
        else:
            decision = admission.admit(state.user_id, running, limits, max_running, priority)
        if isinstance(decision, admission.Reject):
            logger.info("%s refused: %s", state.conversation_id, decision.reason)
            return decision
        if isinstance(decision, admission.Queue):
            queued: list[Event] = []
            if state.status != ConversationStatus.QUEUED:
                queued = [status_event(state, ConversationStatus.QUEUED, decision.reason)]
            await self._append([*prefix, *queued])
            return None
        await self._evict(decision.evict)
        await self._append([*prefix, *start_events(state)])
        return None

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
        """Start the queued conversations that fit now, in queue order."""
        async with self.lock:
            waiting = [
                admission.Waiting(
                    conversation_id=s.conversation_id,
                    user_id=s.user_id,
                    priority=s.spec.priority,
                    since=s.status_since or _LONG_AGO,
                )
                for s in self._held()
                if s.status == ConversationStatus.QUEUED and not s.deleted and not unresolved(s)
            ]
            if not waiting:
                return
            limits = {w.user_id: await self._limits_of(w.user_id) for w in waiting}
            admitted = admission.admit_waiting(
                waiting,
                self._running(),
                limits.__getitem__,
                self._settings.max_running,
                datetime.now(UTC),
            )
            for candidate, decision in admitted:
                await self._evict(decision.evict)
                state = self._states[candidate.conversation_id]
                await self._append(start_events(state))

    async def _limits_of(self, user_id: str) -> admission.UserLimits:
        return admission.user_limits(await self._settings_of(user_id), self._settings)

    def _running(self) -> list[admission.Running]:
        return [
            admission.Running(
                conversation_id=s.conversation_id,
                user_id=s.user_id,
                last_activity=s.last_activity or _LONG_AGO,
                priority=s.spec.priority,
            )
            for s in self._held()
            if holds_slot(s)
        ]

    def _queued(self, user_id: str) -> int:
        return sum(
            1
            for s in self._held()
            if s.user_id == user_id and s.status == ConversationStatus.QUEUED and not s.deleted
        )

    def _held(self) -> list[ConversationState]:
        return [s for s in self._states.values() if self._holds(s.conversation_id)]

    async def _evict(self, conversation_ids: Sequence[str]) -> None:
        for cid in conversation_ids:
            logger.info("evicting %s: its user has too many conversations", cid)
            await self._append(stop_events(self._states[cid], admission.EVICTION_REASON))
