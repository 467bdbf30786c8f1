"""Several session-managers share the partitions: each drives only its share, a leaving one's
conversations go on at the other without a step twice, and a dependency held by one instance
releases its dependent held by the other."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import msgspec

from taskbus.contracts import subjects
from taskbus.contracts.events import (
    CmdRunAction,
    ConversationCreated,
    ConversationStatusChanged,
    LLMMetrics,
    decode_event,
)
from taskbus.contracts.partitions import PARTITIONS, partition_of, rendezvous_owner
from taskbus.contracts.specs import ConcurrencyPolicy
from taskbus.contracts.status import ACTIVE_STATUSES, ConversationStatus
from taskbus.session_manager.app import running_session_manager
from taskbus.session_manager.service import SessionManager
from taskbus.session_manager.settings import SessionManagerSettings

from .test_agent_loop import FakeRuntime, status_reached
from .test_dependencies import World, world

INSTANCES = ("a", "b")


def instance(settings: SessionManagerSettings, name: str) -> SessionManagerSettings:
    """One of the instances, each letting the test's user run all its conversations at once."""
    return msgspec.structs.replace(
        settings,
        instance_id=name,
        max_concurrent_conversations=20,
        max_concurrent_conversations_limit=20,
    )


def owner_of_three(cid: str) -> str | None:
    return rendezvous_owner(partition_of(cid), ("a", "b", "c"))


def owner_of(cid: str) -> str | None:
    return rendezvous_owner(partition_of(cid), INSTANCES)


async def runtimes_owned_by(w: World, name: str, count: int) -> list[FakeRuntime]:
    """Fake runtimes of new conversations whose partition `name` holds when both run."""
    ids = (uuid.uuid4().hex for _ in range(10_000))
    chosen = [
        c for c, _ in zip(filter(lambda c: owner_of(c) == name, ids), range(count), strict=False)
    ]
    runtimes = [FakeRuntime(w.js, cid) for cid in chosen]
    w.runtime_tasks += [asyncio.create_task(r.run()) for r in runtimes]
    await asyncio.sleep(0.1)
    return runtimes


async def until_shared(*managers: SessionManager) -> None:
    """Until the instances hold every partition exactly once between them, each a share (one
    that joins gets its share at the holders' next lease round)."""

    def shared() -> bool:
        held = [m.held_partitions for m in managers]
        return all(held) and sorted(p for h in held for p in h) == list(range(PARTITIONS))

    async with asyncio.timeout(15):
        while not shared():  # noqa: ASYNC110 (leases move in their own rounds: nothing to await)
            await asyncio.sleep(0.05)


def ran_once(runtime: FakeRuntime) -> None:
    assert len(runtime.of(CmdRunAction)) == 1
    assert len(runtime.of(LLMMetrics)) == 2
    assert [e.id for e in runtime.events] == list(range(len(runtime.events)))


async def test_two_instances_share_the_partitions_and_each_drives_its_own(
    tmp_path: Path,
) -> None:
    async with (
        world(tmp_path) as w,
        running_session_manager(instance(w.settings, "a")) as first,
        running_session_manager(instance(w.settings, "b")) as second,
    ):
        await until_shared(first, second)
        runtimes = [*await runtimes_owned_by(w, "a", 4), *await runtimes_owned_by(w, "b", 4)]
        for runtime in runtimes:
            await w.create(runtime)
        for runtime in runtimes:
            await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
            ran_once(runtime)
            holder = first if owner_of(runtime.cid) == "a" else second
            assert partition_of(runtime.cid) in holder.held_partitions


async def test_a_leaving_instances_conversations_finish_at_the_other_without_a_step_twice(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w, running_session_manager(instance(w.settings, "b")) as b:
        async with running_session_manager(instance(w.settings, "a")) as a:
            await until_shared(a, b)
            runtimes = await runtimes_owned_by(w, "a", 6)
            for runtime in runtimes:
                runtime.hold_commands = True  # mid-task when a leaves
                await w.create(runtime)
            for runtime in runtimes:
                await runtime.wait_for(
                    lambda events: any(isinstance(e, CmdRunAction) for e in events)
                )
            left = time.monotonic()
        # a left (its leases handed back): b takes its partitions and the tasks go on.
        await until_shared(b)
        print(f"hand-over after a graceful leave: {time.monotonic() - left:.2f} s")
        for runtime in runtimes:
            await runtime.answer_held()
        for runtime in runtimes:
            await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
            ran_once(runtime)


async def test_a_dependency_one_instance_drives_releases_a_dependent_the_other_drives(
    tmp_path: Path,
) -> None:
    async with (
        world(tmp_path) as w,
        running_session_manager(instance(w.settings, "a")) as a,
        running_session_manager(instance(w.settings, "b")) as b,
    ):
        await until_shared(a, b)
        (dependency,) = await runtimes_owned_by(w, "a", 1)
        (dependent,) = await runtimes_owned_by(w, "b", 1)
        await w.create(dependency)
        # The gateway accepts a dependency only once it exists (the two creates go to two
        # instances: their order is the caller's).
        await dependency.wait_for(lambda es: any(isinstance(e, ConversationCreated) for e in es))
        await w.create(dependent, dependency.cid)
        await dependency.wait_for(status_reached(ConversationStatus.FINISHED))
        # b sees no event of a's partitions: it learns of the end by looking again.
        await dependent.wait_for(status_reached(ConversationStatus.FINISHED))
        ran_once(dependent)


async def test_three_instances_admit_a_users_conversations_as_one_would(tmp_path: Path) -> None:
    """Issue 11's admission check: a user limited to 2, 20 creates at once over 3 instances;
    read in log order, never more than 2 of them hold a slot."""
    async with world(tmp_path) as w:
        limited = msgspec.structs.replace(
            w.settings,
            max_concurrent_conversations=2,
            max_concurrent_conversations_limit=2,
            concurrency_policy=ConcurrencyPolicy.QUEUE,
            max_queued_conversations=20,
            time_limit_check_seconds=0.2,
        )
        async with (
            running_session_manager(msgspec.structs.replace(limited, instance_id="a")) as a,
            running_session_manager(msgspec.structs.replace(limited, instance_id="b")) as b,
            running_session_manager(msgspec.structs.replace(limited, instance_id="c")) as c,
        ):
            await until_shared(a, b, c)
            log = await w.js.subscribe(subjects.ALL_EVENTS, ordered_consumer=True)
            runtimes = await w.runtimes(20)
            await asyncio.gather(*(w.create(runtime) for runtime in runtimes))
            for runtime in runtimes:
                await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
                ran_once(runtime)
            holding: set[str] = set()
            most = 0
            while True:  # every event so far, in log order (all have finished)
                try:
                    message = await log.next_msg(timeout=1)
                except TimeoutError:
                    break
                event = decode_event(message.data)
                if isinstance(event, ConversationStatusChanged):
                    if event.status in ACTIVE_STATUSES:
                        holding.add(event.conversation_id)
                    else:
                        holding.discard(event.conversation_id)
                    most = max(most, len(holding))
            await log.unsubscribe()
            print(f"most of the user's conversations holding a slot at once: {most}")
            assert most == 2
            assert {owner_of_three(r.cid) for r in runtimes} == {"a", "b", "c"}
