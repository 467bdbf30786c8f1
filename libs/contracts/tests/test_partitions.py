"""Partitions agree with NATS' own mapping, and leases give every partition exactly one live
owner: shared out among members, moved when one dies (bounded time) or leaves (at once)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig
from nats.js.errors import ServiceUnavailableError
from nats.js.kv import KeyValue

from taskbus.contracts.partitions import (
    PARTITIONS,
    PartitionLeases,
    member_key,
    partition_of,
    rendezvous_owner,
    renewing_members,
)
from taskbus.devtools.nats_server import NatsServer

LEASE = 1.5
RENEW = 0.5


async def test_partition_of_is_the_partition_nats_server_maps_a_subject_to(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mapping.conf"
    config.write_text(
        'mappings = { "probe.*": "mapped.{{partition(N,1)}}.{{wildcard(1)}}" }\n'.replace(
            "N", str(PARTITIONS)
        )
    )
    ids = [f"conversation-{n}" for n in range(200)] + ["a", "Z_9-x", "0" * 64]
    with NatsServer(tmp_path / "nats", config_file=config) as server:
        nc = await nats.connect(server.url)
        try:
            mapped = await nc.subscribe("mapped.>")
            for cid in ids:
                await nc.publish(f"probe.{cid}", b"")
            for cid in ids:
                message = await mapped.next_msg(timeout=5)
                assert message.subject == f"mapped.{partition_of(cid)}.{cid}"
        finally:
            await nc.drain()
    assert len({partition_of(cid) for cid in ids}) == PARTITIONS  # all used


def test_rendezvous_moves_only_the_partitions_of_a_member_that_leaves() -> None:
    members = ["a", "b", "c"]
    before = {p: rendezvous_owner(p, members) for p in range(PARTITIONS)}
    after = {p: rendezvous_owner(p, ["a", "c"]) for p in range(PARTITIONS)}
    assert {p for p in before if before[p] != after[p]} == {p for p in before if before[p] == "b"}
    assert rendezvous_owner(3, []) is None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path) as server:
        yield server


@pytest.fixture
async def kv(server: NatsServer) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        yield await js.create_key_value(KeyValueConfig(bucket="leases", ttl=LEASE))
    finally:
        await nc.drain()


class Instance:
    """A member that records what it holds, as a service's consumers would follow it."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        self.name = name
        self.owned: set[int] = set()
        self.lost: list[int] = []
        self.leases = PartitionLeases(
            kv,
            "group",
            name,
            on_acquired=self._acquired,
            on_lost=self._lost,
            renew_seconds=RENEW,
            lease_seconds=LEASE,
        )

    async def _acquired(self, partitions: frozenset[int]) -> None:
        assert partitions and not partitions & self.owned
        self.owned |= partitions

    async def _lost(self, partitions: frozenset[int]) -> None:
        assert partitions and partitions <= self.owned
        self.owned -= partitions
        self.lost += sorted(partitions)


async def settled(instances: list[Instance], within: float = 10) -> float:
    """Seconds until each live instance owns exactly its rendezvous share (so every partition
    has one owner)."""
    names = [instance.name for instance in instances]
    start = time.monotonic()
    while time.monotonic() - start < within:
        if all(
            instance.owned
            == {p for p in range(PARTITIONS) if rendezvous_owner(p, names) == instance.name}
            for instance in instances
        ):
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"not settled: {[sorted(i.owned) for i in instances]}")


async def test_leases_share_the_partitions_and_move_those_of_a_dead_or_leaving_member(
    kv: KeyValue,
) -> None:
    instances = [Instance(kv, name) for name in ("a", "b", "c")]
    for instance in instances:
        await instance.leases.start()
    await settled(instances)
    assert all(instance.owned for instance in instances)  # each has a share
    for partition in range(PARTITIONS):
        owner = await instances[0].leases.owner(partition)
        assert owner is not None and partition in instances["abc".index(owner)].owned

    # b dies: no hand-back, its leases run out and the others take them.
    dead = instances[1]
    assert dead.leases._task is not None
    dead.leases._task.cancel()
    hand_over = await settled([instances[0], instances[2]], within=LEASE + 4 * RENEW + 5)
    print(f"hand-over after a member died: {hand_over:.2f} s (lease {LEASE} s)")
    assert hand_over < LEASE + 3 * RENEW + 1.0

    # c leaves cleanly: a has everything at its next round, no TTL to wait for.
    await instances[2].leases.stop()
    assert not instances[2].owned
    hand_over = await settled([instances[0]])
    print(f"hand-over after a member left: {hand_over:.2f} s")
    assert hand_over < 2 * RENEW + 0.5
    await instances[0].leases.stop()


async def test_two_members_racing_for_a_free_partition_never_both_hold_it(kv: KeyValue) -> None:
    first, second = Instance(kv, "x"), Instance(kv, "y")
    # Both believe they should own partition 0 (each sees only itself): create decides.
    won = await asyncio.gather(first.leases._acquire(0), second.leases._acquire(0))
    assert sorted(won) == [False, True]
    assert (0 in first.leases.held) != (0 in second.leases.held)


async def test_a_late_member_whose_leases_still_stand_keeps_them_and_its_work(
    kv: KeyValue,
) -> None:
    """A starved event loop (CI load, a long import in a thread) makes a round late: the
    revision-checked renewal proves nobody took the leases, so nothing is dropped."""
    late = Instance(kv, "late")
    await late.leases.start()
    assert sorted(late.owned) == list(range(PARTITIONS))
    late.leases._renewed_at -= LEASE  # as after a stall longer than the lease's margin
    await asyncio.sleep(RENEW * 2.5)
    assert late.lost == []
    assert sorted(late.leases.held) == list(range(PARTITIONS))
    await late.leases.stop()


class StumblingInstance(Instance):
    """Its first release fails after letting go, as a session-manager's did when a
    conversation it was dropping had been forgotten meanwhile (KeyError)."""

    async def _lost(self, partitions: frozenset[int]) -> None:
        first = not self.lost
        await super()._lost(partitions)
        if first:
            raise KeyError("forgotten meanwhile")


async def test_a_member_whose_leases_lapsed_gives_them_up_and_its_lease_loop_goes_on(
    kv: KeyValue,
) -> None:
    stalled = StumblingInstance(kv, "stalled")
    await stalled.leases.start()
    assert sorted(stalled.owned) == list(range(PARTITIONS))
    for partition in range(PARTITIONS):  # the leases lapse, as the bucket's TTL removes them
        await kv.delete(stalled.leases._lease_key(partition))
    for _ in range(100):
        if sorted(stalled.lost) == list(range(PARTITIONS)):
            break
        await asyncio.sleep(RENEW / 5)
    # Its renewals failed: it let go of every lease, each once, ...
    assert sorted(stalled.lost) == list(range(PARTITIONS))
    # ... its failed release did not end its lease loop, and it takes the free leases again.
    await settled([stalled], within=6 * RENEW)
    assert sorted(stalled.leases.held) == list(range(PARTITIONS))
    await stalled.leases.stop()


async def test_a_member_cut_off_from_the_bucket_gives_its_partitions_up(
    server: NatsServer, kv: KeyValue
) -> None:
    """It cannot renew, so it stops acting on its partitions before their leases run out and
    another instance takes them (the appender's expected sequence is the second guard)."""
    nc = await nats.connect(server.url)
    cut_off = Instance(await nc.jetstream().key_value("leases"), "cut-off")
    await cut_off.leases.start()
    assert sorted(cut_off.owned) == list(range(PARTITIONS))
    await nc.close()
    for _ in range(100):
        if not cut_off.owned:
            break
        await asyncio.sleep(RENEW / 5)
    assert sorted(cut_off.lost) == list(range(PARTITIONS))
    assert not cut_off.leases.held
    await cut_off.leases.stop()


class FlakyInstance(Instance):
    """Its first take-over fails, as when JetStream is too busy to create the consumers."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        super().__init__(kv, name)
        self.failures = 0

    async def _acquired(self, partitions: frozenset[int]) -> None:
        if not self.failures:
            self.failures += 1
            raise ServiceUnavailableError()
        await super()._acquired(partitions)

    async def _lost(self, partitions: frozenset[int]) -> None:
        self.owned -= partitions  # also told of partitions it never took over
        self.lost += sorted(partitions)


async def test_partitions_whose_take_over_failed_are_handed_back_and_taken_again(
    kv: KeyValue,
) -> None:
    flaky = FlakyInstance(kv, "flaky")
    await flaky.leases.start()  # the failure is logged, not raised
    assert flaky.failures == 1 and not flaky.owned and not flaky.leases.held
    assert sorted(flaky.lost) == list(range(PARTITIONS))  # its consumers were told to stop
    assert await flaky.leases.owner(0) is None  # freed at once, not held until the TTL
    await settled([flaky], within=3 * RENEW + 1)
    assert sorted(flaky.leases.held) == list(range(PARTITIONS))
    await flaky.leases.stop()


async def test_renewing_members_names_the_live_instances_never_a_dead_ones_key(
    kv: KeyValue,
) -> None:
    """What a rebuild asks before it replaces a group's consumers: no member returns at once, a
    live one is named within a renewal, a dead one's last heartbeat is not taken for life."""
    assert await renewing_members(kv, "group", lease_seconds=LEASE) == []
    await kv.put(member_key("group", "dead"), b"")  # a heartbeat never renewed
    await kv.put(member_key("other", "live-elsewhere"), b"")
    live = Instance(kv, "live")
    await live.leases.start()
    try:
        assert await renewing_members(kv, "group", lease_seconds=LEASE) == ["live"]
    finally:
        await live.leases.stop()
    started = time.monotonic()
    assert await renewing_members(kv, "group", lease_seconds=LEASE) == []  # "dead" ages out
    assert time.monotonic() - started < 2 * LEASE + 5
