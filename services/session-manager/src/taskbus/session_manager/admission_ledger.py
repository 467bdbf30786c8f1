"""Who holds a slot and who waits, across every session-manager: one KV entry, revision-checked.

Admission must be global: with conversations partitioned among instances, none holds every
state, yet per-user and global limits count them all. The ledger is the shared count. An
instance decides from the ledger as read (with its revision), writes the ledger it decided, and
only once that write won appends the events; a write that lost (another instance admitted in
between) means deciding again from the newer ledger. So N instances admit exactly as one would:
every decision is taken on the latest ledger, one at a time, as under one lock. The ledger an
instance last read or wrote serves as read until a write says otherwise (`decide`): a decision
that writes costs no read, one that writes nothing is taken again on a fresh read.

The log stays the truth. An instance that dies between its ledger write and its append leaves
an entry the log does not show; `stale_entries` finds those (and conversations the ledger
forgot) for the partitions an instance owns, and the sweep repairs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects

logger = logging.getLogger(__name__)

LEDGER_KEY = "ledger"
T = TypeVar("T")
# An entry the log does not confirm is dropped only after this: an admission in flight (ledger
# written, events not yet appended) is not mistaken for a lost one.
UNCONFIRMED_GRACE = timedelta(seconds=60)


class Slot(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    priority: int = 0
    since: datetime  # when it was admitted, or began to wait


class Ledger(msgspec.Struct, frozen=True, kw_only=True):
    running: dict[str, Slot] = {}
    queued: dict[str, Slot] = {}

    def running_of(self, user_id: str) -> list[str]:
        return [cid for cid, slot in self.running.items() if slot.user_id == user_id]

    def queued_count(self, user_id: str) -> int:
        return sum(1 for slot in self.queued.values() if slot.user_id == user_id)

    def admitted(self, conversation_id: str, slot: Slot, evicted: Iterable[str]) -> Ledger:
        running = {cid: s for cid, s in self.running.items() if cid not in set(evicted)}
        running[conversation_id] = slot
        queued = {cid: s for cid, s in self.queued.items() if cid != conversation_id}
        return Ledger(running=running, queued=queued)

    def waiting(self, conversation_id: str, slot: Slot) -> Ledger:
        running = {cid: s for cid, s in self.running.items() if cid != conversation_id}
        return Ledger(running=running, queued={**self.queued, conversation_id: slot})

    def without(self, conversation_ids: Iterable[str]) -> Ledger:
        gone = set(conversation_ids)
        return Ledger(
            running={cid: s for cid, s in self.running.items() if cid not in gone},
            queued={cid: s for cid, s in self.queued.items() if cid not in gone},
        )


_decoder = msgspec.json.Decoder(Ledger)


class LedgerConflict(Exception):
    """Another instance wrote the ledger since it was read: decide again."""


class AdmissionLedger:
    """The ledger in KV bucket `bucket`, looked up on first use."""

    def __init__(self, js: JetStreamContext, bucket: str = subjects.ADMISSION_BUCKET) -> None:
        self._js = js
        self._bucket = bucket
        self._kv: KeyValue | None = None
        # The ledger and revision as this instance last read or wrote them (None: unknown).
        self._last: tuple[Ledger, int] | None = None

    async def _store(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(self._bucket)
        return self._kv

    async def read(self) -> tuple[Ledger, int]:
        """The ledger and its revision (0: never written)."""
        try:
            entry = await (await self._store()).get(LEDGER_KEY)
        except KeyNotFoundError:
            self._last = Ledger(), 0
            return self._last
        if not entry.value:  # deleted by an operator: start empty, the sweep refills it
            self._last = Ledger(), entry.revision or 0
        else:
            self._last = _decoder.decode(entry.value), entry.revision or 0
        return self._last

    async def write(self, ledger: Ledger, revision: int) -> int:
        """Write `ledger` if the stored one is still at `revision`; else LedgerConflict."""
        data = msgspec.json.encode(ledger)
        kv = await self._store()
        self._last = None  # unknown until the write's answer
        try:
            if revision == 0:
                written = await kv.create(LEDGER_KEY, data)
            else:
                written = await kv.update(LEDGER_KEY, data, last=revision)
        except KeyWrongLastSequenceError as error:
            raise LedgerConflict from error
        self._last = ledger, written
        return written

    async def decide(self, choose: Callable[[Ledger], tuple[Ledger, T]]) -> tuple[Ledger, T]:
        """Apply `choose` (pure: the ledger it makes of a ledger, and what else it decided) to
        the latest ledger until the ledger it makes is written; that ledger and its decision.
        It is first given the ledger as this instance last read or wrote it, which the write's
        revision check proves latest (or a conflict refutes), so a decision that writes costs
        no read; one that leaves the ledger as it is stands only on a ledger read now."""
        last, read_now = self._last, False
        while True:
            if last is None:
                last, read_now = await self.read(), True
            ledger, revision = last
            changed, decision = choose(ledger)
            if changed == ledger:
                if read_now:
                    return ledger, decision
                last = None
                continue
            try:
                await self.write(changed, revision)
            except LedgerConflict:
                last = None
                continue
            return changed, decision

    async def change(self, edit: Callable[[Ledger], Ledger]) -> Ledger:
        """Apply `edit` (pure) to the latest ledger until a write wins; the ledger written."""
        changed, _ = await self.decide(lambda ledger: (edit(ledger), None))
        return changed


def stale_entries(
    ledger: Ledger,
    owned: Callable[[str], bool],
    holds_slot: Callable[[str], bool | None],
    waits: Callable[[str], bool | None],
    now: datetime,
) -> list[str]:
    """Entries of conversations this instance `owned` whose log says otherwise (`holds_slot` /
    `waits` answer from the folded state, None when the conversation is not loaded), once past
    the grace an admission in flight needs."""
    stale = []
    for entries, confirmed in ((ledger.running, holds_slot), (ledger.queued, waits)):
        for cid, slot in entries.items():
            if owned(cid) and confirmed(cid) is False and now - slot.since > UNCONFIRMED_GRACE:
                stale.append(cid)
    return stale
