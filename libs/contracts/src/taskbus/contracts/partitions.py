"""Conversations in a fixed number of partitions, and partitions owned through leases in KV.

`partition_of` is FNV-1a (32 bit) of the conversation id modulo `PARTITIONS`: the hash NATS'
own `{{partition(n, …)}}` subject mapping uses, so a server-side mapping of a conversation's
subjects agrees with every service's computation (test_partitions checks it on nats-server).

`PartitionLeases` gives an instance of a stateful service (its `group`) a share of the
partitions. Each instance heartbeats a member key; every partition goes to the live member that
wins rendezvous hashing for it, so the assignment is balanced, changes little when a member comes
or goes, and needs no coordinator. Ownership is a KV entry written with a revision check
(`create` for a free partition, `update(last=…)` to renew), so two instances never hold the same
lease; the bucket's TTL removes the lease of an instance that stopped renewing, so a dead
instance's partitions move within `LEASE_SECONDS` plus one renewal. An instance that cannot
reach the bucket to renew in time gives its partitions up itself (`on_lost`) before its lease
can expire. One that was merely late (its event loop starved of CPU, or paused) renews first: a
revision-checked renewal that succeeds proves nobody took the lease meanwhile, so it goes on
without dropping its conversations' work in flight; one that fails gives the partition up. Even
if a paused instance acted late on a partition it lost, the log's expected-sequence appends
(contracts.appender) refuse its write, so a conversation's history never forks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from taskbus.contracts.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

PARTITIONS = 16
# A lease not renewed for this long is gone (the bucket's TTL): the bound on a hand-over.
LEASE_SECONDS = 6.0
# Renewed this often: three chances before the lease expires.
RENEW_SECONDS = LEASE_SECONDS / 3

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193

# Told of the partitions acquired, or lost, in one round (never an empty set).
PartitionCallback = Callable[[frozenset[int]], Awaitable[None]]


def fnv1a_32(data: bytes) -> int:
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


@functools.lru_cache(maxsize=16_384)
def partition_of(conversation_id: str, partitions: int = PARTITIONS) -> int:
    """The partition of a conversation: the same in every service and in NATS' mappings.
    Remembered for the most recent ids: a service asks it of every message it takes, and the
    hash is a Python loop over the id's bytes."""
    return fnv1a_32(conversation_id.encode()) % partitions


def rendezvous_owner(partition: int, members: Iterable[str]) -> str | None:
    """The member that should own `partition`: the highest hash of (member, partition)."""

    def weight(member: str) -> bytes:
        return hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()

    return max(members, key=weight, default=None)


def member_key(group: str, instance: str) -> str:
    """The KV key an instance of `group` heartbeats while it runs."""
    return f"{group}.members.{instance}"


async def renewing_members(
    kv: KeyValue, group: str, *, lease_seconds: float = LEASE_SECONDS, poll_seconds: float = 0.1
) -> list[str]:
    """The instances of `group` still running: those whose heartbeat is put again while we
    watch. A dead instance's key only ages out (the bucket's TTL, enforced with some lag), so
    this waits up to two leases, and returns at once when the group has no member key at all."""
    first = await _member_revisions(kv, group)
    deadline = time.monotonic() + 2 * lease_seconds
    while first:
        current = await _member_revisions(kv, group)
        renewed = [m for m, revision in current.items() if revision != first.get(m)]
        if renewed:
            return sorted(renewed)
        if not current:
            return []
        if time.monotonic() > deadline:
            return sorted(current)  # outlived its TTL: not ours to call dead
        await asyncio.sleep(poll_seconds)
    return []


async def _members(kv: KeyValue, group: str) -> set[str]:
    prefix = member_key(group, "")
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return set()
    return {key.removeprefix(prefix) for key in keys if key.startswith(prefix)}


async def _member_revisions(kv: KeyValue, group: str) -> dict[str, int]:
    revisions: dict[str, int] = {}
    for member in await _members(kv, group):
        with contextlib.suppress(KeyNotFoundError):  # aged out meanwhile
            entry = await kv.get(member_key(group, member))
            if entry.revision is not None:
                revisions[member] = entry.revision
    return revisions


def default_instance_id() -> str:
    """An instance's name when the operator gives none: unique on the host and over time."""
    return f"{socket.gethostname()}-{os.getpid()}"


class PartitionLeases:
    """This instance's share of `group`'s partitions, kept up to date until `stop`."""

    def __init__(
        self,
        kv: KeyValue,
        group: str,
        instance: str,
        *,
        on_acquired: PartitionCallback,
        on_lost: PartitionCallback,
        partitions: int = PARTITIONS,
        renew_seconds: float = RENEW_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        """`kv` must have a TTL of `lease_seconds` (streams.bucket_configs makes it so)."""
        self._kv = kv
        self._group = group
        self._instance = instance
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._partitions = partitions
        self._renew_seconds = renew_seconds
        self._lease_seconds = lease_seconds
        self._held: dict[int, int] = {}  # partition -> revision of our lease
        self._renewed_at = 0.0  # monotonic start of the last successful round
        self._task: asyncio.Task[None] | None = None

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def _lease_key(self, partition: int) -> str:
        return f"{self._group}.p{partition}"

    async def start(self) -> None:
        """Join, take this instance's share of the free partitions, then keep renewing."""
        await self._round()
        self._task = asyncio.create_task(self._run(), name=f"{self._group}-leases")

    async def stop(self) -> None:
        """Give every partition back at once (no wait for a TTL) and leave."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._hand_back(sorted(self._held))
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._kv.delete(member_key(self._group, self._instance))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._renew_seconds)
            await self._round()

    async def _round(self) -> None:
        """A rebalance; one that fails is retried by the next round. Nothing a round raises
        ends the loop: an instance whose lease loop died would hold no partition for good."""
        try:
            await self.rebalance()
        except (nats.errors.Error, TimeoutError) as error:
            logger.warning("%s: lease round failed: %r", self, error)
        except Exception:
            logger.exception("%s: lease round failed", self)
        try:
            if time.monotonic() - self._renewed_at > self._lease_seconds - self._renew_seconds:
                # Not renewed, and too late to be sure the leases still stand: stop acting on
                # them before they can expire and another instance takes them.
                if self._held:
                    logger.warning("%s: leases not renewed in time: %s", self, sorted(self._held))
                await self._lose(sorted(self._held))
        except Exception:
            logger.exception("%s: giving up stale leases failed", self)

    async def rebalance(self) -> None:
        """One round: heartbeat, renew what we keep, hand back what another member should own,
        take what is ours and free."""
        started = time.monotonic()  # no lease renewed below can expire before started + TTL
        await self._kv.put(member_key(self._group, self._instance), b"")
        members = await self._members()
        lost: list[int] = []
        handed_back: list[int] = []
        acquired: list[int] = []
        for partition in range(self._partitions):
            owner = rendezvous_owner(partition, members)
            if partition in self._held:
                if owner != self._instance:  # a member joined that should own it
                    handed_back.append(partition)
                elif not await self._renew(partition):
                    lost.append(partition)
            elif owner == self._instance and await self._acquire(partition):
                acquired.append(partition)
        self._renewed_at = started
        await self._lose(lost)
        await self._hand_back(handed_back)  # the member that should own them takes them now
        if acquired:
            logger.info("%s: acquired partitions %s", self, acquired)
            try:
                await self._on_acquired(frozenset(acquired))
            except Exception:
                # Not taken over (JetStream busy, say): held but consumed by nobody, they would
                # stall until this instance left. Handed back, a later round takes them again.
                await self._hand_back(acquired)
                raise

    async def _members(self) -> list[str]:
        return sorted(await _members(self._kv, self._group) | {self._instance})

    async def _renew(self, partition: int) -> bool:
        """Whether the lease is still ours (renewed); False: it expired, or was taken."""
        try:
            self._held[partition] = await self._kv.update(
                self._lease_key(partition), self._instance.encode(), last=self._held[partition]
            )
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _acquire(self, partition: int) -> bool:
        key = self._lease_key(partition)
        try:
            self._held[partition] = await self._kv.create(key, self._instance.encode())
        except KeyWrongLastSequenceError:
            # Still held by its previous owner until it hands it back or expires, unless that
            # owner is this instance: after a stall it gave its leases up without knowing if they
            # still stood, and one that still names it is taken back at once (revision-checked,
            # so not if another instance wrote it meanwhile), not after the TTL.
            try:
                entry = await self._kv.get(key)
                if entry.value != self._instance.encode() or entry.revision is None:
                    return False
                self._held[partition] = await self._kv.update(
                    key, self._instance.encode(), last=entry.revision
                )
            except (KeyNotFoundError, KeyWrongLastSequenceError):
                return False
        return True

    async def _hand_back(self, partitions: list[int]) -> None:
        """Stop acting on the partitions, then free their leases at once (no wait for a TTL)."""
        await self._lose(partitions)
        for partition in partitions:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._kv.delete(self._lease_key(partition))

    async def _lose(self, partitions: list[int]) -> None:
        gone = frozenset(p for p in partitions if self._held.pop(p, None) is not None)
        if gone:
            logger.info("%s: gave up partitions %s", self, sorted(gone))
            await self._on_lost(gone)

    async def owner(self, partition: int) -> str | None:
        """The instance holding `partition`'s lease now, if any."""
        try:
            entry = await self._kv.get(self._lease_key(partition))
        except KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    def __repr__(self) -> str:
        return f"PartitionLeases({self._group}/{self._instance})"
