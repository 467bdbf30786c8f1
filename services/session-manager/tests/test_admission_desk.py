"""The admission desk against in-memory states: what it counts as a held slot, what it appends,
and that a freed slot goes to the queue. The log is a dict folded the way the service folds it."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from taskbus.contracts.appender import StaleAppend
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationRejected,
    ConversationStatusChanged,
    Event,
    EventSource,
)
from taskbus.contracts.specs import ConcurrencyPolicy, ConversationSpec, UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.session_manager.admission import QUEUE_FULL_REASON
from taskbus.session_manager.admission_desk import AdmissionDesk
from taskbus.session_manager.admission_ledger import AdmissionLedger
from taskbus.session_manager.decide import status_event
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.state import ConversationState, apply

_S = ConversationStatus
# The operator of tests/security/test_quotas.py: 2 running, 1 per user, 2 queued per user.
OPERATOR = SessionManagerSettings(
    max_running=2, max_concurrent_conversations_limit=1, max_queued_conversations=2
)
GREEDY = UserSettings(max_concurrent_conversations=1000, concurrency_policy=ConcurrencyPolicy.QUEUE)


class Log:
    """Conversations' logs and the states folded from them, both advanced by every append as
    the service's `_append` does, the admission ledger following each status change as the
    service's `_observe` makes it. What is `written_elsewhere` (by a stalled instance that held
    the partition before) reaches the log only: an append decided on a state that lags the log
    is refused as the appender refuses it (`StaleAppend`), the state folded again first."""

    def __init__(self, user_settings: dict[str, UserSettings]) -> None:
        self.states: dict[str, ConversationState] = {}
        self.appended: list[Event] = []
        self._user_settings = user_settings
        self._desk: AdmissionDesk | None = None

    def desk(self, settings: SessionManagerSettings, ledger: AdmissionLedger) -> AdmissionDesk:
        self._desk = AdmissionDesk(settings, self.states, self.settings_of, self.append, ledger)
        return self._desk

    async def settings_of(self, user_id: str) -> UserSettings | None:
        return self._user_settings.get(user_id)

    async def append(self, events: Sequence[Event], after: int) -> None:
        if events:
            cid = events[0].conversation_id
            if self._last_id(cid) != after:
                self.states[cid] = self._fold(cid)
                raise StaleAppend(cid, after, self._last_id(cid))
        for event in self.written_elsewhere(events):
            cid = event.conversation_id
            state = self.states.get(cid) or ConversationState(conversation_id=cid)
            self.states[cid] = apply(state, event)
            if isinstance(event, ConversationStatusChanged) and self._desk is not None:
                await self._desk.settle(self.states[cid])

    def written_elsewhere(self, events: Sequence[Event]) -> list[Event]:
        """Put `events` in the log (only), each with its id; returned as stored."""
        stored = []
        for event in events:
            cid = event.conversation_id
            stored.append(msgspec.structs.replace(event, id=self._last_id(cid) + 1))
            self.appended.append(stored[-1])
        return stored

    def _last_id(self, cid: str) -> int:
        return max((e.id for e in self.appended if e.conversation_id == cid), default=-1)

    def _fold(self, cid: str) -> ConversationState:
        state = ConversationState(conversation_id=cid)
        for event in self.appended:
            if event.conversation_id == cid:
                state = apply(state, event)
        return state

    def statuses(self, cid: str) -> list[ConversationStatus]:
        return [
            e.status
            for e in self.appended
            if isinstance(e, ConversationStatusChanged) and e.conversation_id == cid
        ]


def created(cid: str, user_id: str) -> ConversationCreated:
    return ConversationCreated(
        conversation_id=cid,
        source=EventSource.USER,
        user_id=user_id,
        spec=ConversationSpec(initial_user_msg="Hold on."),
        title="t",
    )


async def create(desk: AdmissionDesk, cid: str, user_id: str) -> str | None:
    """What the service's create does; the refusal's reason, if refused."""
    event = created(cid, user_id)
    state = apply(ConversationState(conversation_id=cid), msgspec.structs.replace(event, id=0))
    async with desk.lock:
        refused = await desk.start_or_queue(state, [event], new=True)
    return None if refused is None else refused.reason


async def test_another_user_gets_the_free_slot_while_a_greedy_users_queue_is_full(
    ledger: AdmissionLedger,
) -> None:
    log = Log({"greedy": GREEDY})
    desk = log.desk(OPERATOR, ledger)

    assert [await create(desk, f"g{i}", "greedy") for i in range(4)] == [
        None,
        None,
        None,
        QUEUE_FULL_REASON,
    ]
    assert [log.statuses(f"g{i}") for i in range(4)] == [
        [_S.STARTING],
        [_S.QUEUED],
        [_S.QUEUED],
        [],
    ]
    assert "g3" not in log.states  # a refused create appends nothing
    # The service records the refusal; a conversation that names no status holds no slot.
    rejected = ConversationRejected(
        conversation_id="g3", source=EventSource.ENVIRONMENT, user_id="greedy", reason="r"
    )
    await log.append([rejected], -1)

    assert await create(desk, "b0", "bob") is None
    assert log.statuses("b0") == [_S.STARTING]


async def test_a_freed_slot_goes_to_the_queue_and_a_restart_respects_the_cap(
    ledger: AdmissionLedger,
) -> None:
    log = Log({"greedy": GREEDY})
    desk = log.desk(OPERATOR, ledger)
    for cid, user in (("g0", "greedy"), ("g1", "greedy"), ("b0", "bob"), ("c0", "carol")):
        await create(desk, cid, user)
    assert log.statuses("c0") == [_S.QUEUED]  # capacity: g0 and b0 run

    await desk.admit_waiting()
    assert log.statuses("g1") == [_S.QUEUED] and log.statuses("c0") == [_S.QUEUED]

    await log.append(
        [status_event(log.states["b0"], _S.STOPPED, "user_stop")], log.states["b0"].last_event_id
    )
    await desk.admit_waiting()
    assert log.statuses("c0") == [_S.QUEUED, _S.STARTING]  # g1 still waits for g0's slot
    assert log.statuses("g1") == [_S.QUEUED]

    # A stopped conversation restarted while two run waits in the queue.
    assert await desk.restart("b0") is None
    assert log.statuses("b0") == [_S.STARTING, _S.STOPPED, _S.QUEUED]


async def test_a_start_decided_on_a_state_the_log_has_left_appends_nothing(
    ledger: AdmissionLedger,
) -> None:
    """The hand-over bug the scale-out test found: a stalled instance that held the partition
    stopped c0 after this instance folded it QUEUED. When a slot frees, c0 is not started: the
    start is refused on the moved log, c0 is folded again, and the ledger follows the log."""
    log = Log({})
    desk = log.desk(OPERATOR, ledger)
    for cid, user in (("a0", "alice"), ("b0", "bob"), ("c0", "carol")):
        await create(desk, cid, user)
    assert log.statuses("c0") == [_S.QUEUED]  # capacity: a0 and b0 run
    log.written_elsewhere([status_event(log.states["c0"], _S.STOPPED, "user_stop")])

    a0 = log.states["a0"]
    await log.append([status_event(a0, _S.FINISHED)], a0.last_event_id)  # a slot frees
    await desk.admit_waiting()

    assert log.statuses("c0") == [_S.QUEUED, _S.STOPPED]
    assert log.states["c0"].status == _S.STOPPED
    entries, _ = await ledger.read()
    assert "c0" not in entries.running and "c0" not in entries.queued
