"""The admission ledger on a real KV bucket: concurrent writers from separate connections never
lose an update, a stale write is refused, and entries the log does not confirm are found."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig

from taskbus.devtools.nats_server import NatsServer
from taskbus.session_manager.admission_ledger import (
    UNCONFIRMED_GRACE,
    AdmissionLedger,
    Ledger,
    LedgerConflict,
    Slot,
    stale_entries,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
async def ledgers(tmp_path: Path) -> AsyncIterator[list[AdmissionLedger]]:
    """Three ledgers on one bucket, each over its own connection (as three instances)."""
    with NatsServer(tmp_path) as server:
        connections = [await nats.connect(server.url) for _ in range(3)]
        try:
            await (
                connections[0]
                .jetstream()
                .create_key_value(KeyValueConfig(bucket="admission", history=1))
            )
            yield [AdmissionLedger(nc.jetstream(), bucket="admission") for nc in connections]
        finally:
            for nc in connections:
                await nc.drain()


async def test_concurrent_admissions_from_three_instances_lose_no_update(
    ledgers: list[AdmissionLedger],
) -> None:
    async def admit(ledger: AdmissionLedger, cid: str) -> None:
        slot = Slot(user_id="u", since=NOW)
        await ledger.change(lambda current: current.admitted(cid, slot, ()))

    await asyncio.gather(
        *(admit(ledgers[n % 3], f"c{n}") for n in range(30)),
    )
    ledger, revision = await ledgers[0].read()
    assert sorted(ledger.running) == sorted(f"c{n}" for n in range(30))
    assert revision >= 30

    await asyncio.gather(
        *(ledgers[n % 3].change(lambda c, n=n: c.without([f"c{n}"])) for n in range(0, 30, 2))
    )
    ledger, _ = await ledgers[1].read()
    assert sorted(ledger.running) == sorted(f"c{n}" for n in range(1, 30, 2))


async def test_a_write_from_a_stale_read_is_refused(ledgers: list[AdmissionLedger]) -> None:
    first, second = ledgers[0], ledgers[1]
    ledger, revision = await first.read()
    await second.write(ledger.waiting("x", Slot(user_id="u", since=NOW)), revision)
    with pytest.raises(LedgerConflict):
        await first.write(ledger.admitted("y", Slot(user_id="u", since=NOW), ()), revision)
    assert list((await first.read())[0].queued) == ["x"]


def test_admitting_a_waiting_conversation_moves_it_and_evicts_in_one_step() -> None:
    slot = Slot(user_id="u", since=NOW)
    ledger = Ledger(running={"old": slot}, queued={"new": slot})
    after = ledger.admitted("new", slot, evicted=["old"])
    assert after.running == {"new": slot} and after.queued == {}
    assert after.running_of("u") == ["new"] and after.queued_count("u") == 0


def test_only_owned_entries_the_log_contradicts_past_the_grace_are_stale() -> None:
    old = NOW - UNCONFIRMED_GRACE - timedelta(seconds=1)
    ledger = Ledger(
        running={
            "lost": Slot(user_id="u", since=old),  # log: never started
            "fresh": Slot(user_id="u", since=NOW),  # admission in flight
            "elsewhere": Slot(user_id="u", since=old),  # another instance's partition
            "running": Slot(user_id="u", since=old),
            "unloaded": Slot(user_id="u", since=old),
        },
        queued={"started": Slot(user_id="u", since=old)},
    )
    holds = {"lost": False, "fresh": False, "elsewhere": False, "running": True}
    stale = stale_entries(
        ledger,
        owned=lambda cid: cid != "elsewhere",
        holds_slot=holds.get,
        waits={"started": False}.get,
        now=NOW,
    )
    assert sorted(stale) == ["lost", "started"]


async def test_a_decision_on_the_ledger_last_written_reads_nothing_unless_it_writes_nothing(
    ledgers: list[AdmissionLedger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance decides first on the ledger as it last wrote it: the write's revision check
    proves that one latest. A decision that changes nothing is taken again on a fresh read, or
    another instance's write in between would go unseen."""
    mine, other = ledgers[0], ledgers[1]
    slot = Slot(user_id="u", since=NOW)
    await mine.change(lambda current: current.admitted("a", slot, ()))
    reads = 0
    read = mine.read

    async def counted() -> tuple[Ledger, int]:
        nonlocal reads
        reads += 1
        return await read()

    monkeypatch.setattr(mine, "read", counted)
    await mine.change(lambda current: current.admitted("b", slot, ()))
    assert reads == 0
    await other.change(lambda current: current.without(["a"]))  # unseen by `mine`
    # By the ledger `mine` wrote, "a" runs already: nothing to write, so it reads, and restores it.
    ledger = await mine.change(
        lambda current: current.admitted("a", slot, ()) if "a" not in current.running else current
    )
    assert reads == 1
    assert sorted(ledger.running) == ["a", "b"]
    assert sorted((await other.read())[0].running) == ["a", "b"]
    # A write from a ledger another instance has changed since conflicts, then reads.
    await other.change(lambda current: current.without(["b"]))
    ledger = await mine.change(lambda current: current.waiting("c", slot))
    assert reads == 2
    assert sorted(ledger.running) == ["a"] and list(ledger.queued) == ["c"]
