"""Session-manager's durable consumers: FastStream's, acking only what is stored, redelivering
what failed, and never stalled by a message crafted to break the consumer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from taskbus.contracts import subjects
from taskbus.contracts.commands import UpdateSettings
from taskbus.contracts.events import CmdOutputObservation, CmdRunAction
from taskbus.contracts.partitions import partition_of
from taskbus.contracts.specs import ConversationSpec, UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.streams import ensure_streams
from taskbus.session_manager.log import SettingsStore

from .test_agent_loop import agent_stack, send, status_reached

APP = "taskbus-session-manager"
USER_COMMANDS = subjects.SESSION_MANAGER_USER_COMMANDS_DURABLE


def events_durable(cid: str) -> str:
    return subjects.session_manager_events_durable(partition_of(cid))


def received(handler_prefix: str) -> float:
    """Messages session-manager's FastStream consumers took from subjects of this family."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "faststream_received_messages"
        for sample in metric.samples
        if sample.name.endswith("_total")
        and sample.labels.get("app_name") == APP
        and sample.labels.get("handler", "").startswith(handler_prefix)
    )


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not await check():  # noqa: ASYNC110 (a condition on the server, no event to wait on)
            await asyncio.sleep(0.05)


async def all_acked(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_conversation_is_consumed_through_faststream(tmp_path: Path) -> None:
    events_before = received(f"{subjects.EVENTS_PREFIX}.*.*.")
    commands_before = received(f"{subjects.COMMANDS_PREFIX}.{subjects.SESSION_MANAGER}.*.")
    spec = ConversationSpec(initial_user_msg="Do the demo.")
    async with agent_stack(tmp_path, None) as stack, stack.conversation("erin", spec) as runtime:
        await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
        # Everything delivered is acked once handled.
        durable = events_durable(runtime.cid)
        await eventually(lambda: all_acked(stack.js, subjects.EVENTS_STREAM, durable))

    # FastStream's Prometheus middleware counted what the durables delivered, per subject family
    # (the runtime's observations arrive only through the events consumer).
    assert received(f"{subjects.EVENTS_PREFIX}.*.*.") - events_before >= 2
    commands = received(f"{subjects.COMMANDS_PREFIX}.{subjects.SESSION_MANAGER}.*.")
    assert commands > commands_before
    labels = {
        sample.labels.get("handler", "")
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.labels.get("app_name") == APP
    }
    assert not [label for label in labels if runtime.cid in label]


async def test_a_command_whose_write_fails_is_redelivered_and_stored_once_it_can_be(
    tmp_path: Path,
) -> None:
    async with agent_stack(tmp_path, None) as stack:
        js = stack.js
        await js.delete_key_value(subjects.SETTINGS_BUCKET)
        update = UpdateSettings(user_id="dora", settings=UserSettings(max_iterations=7))
        await send(js, update, "UpdateSettings")

        async def redelivered() -> bool:
            info = await js.consumer_info(subjects.COMMANDS_STREAM, USER_COMMANDS)
            return info.num_redelivered > 0

        await eventually(redelivered)  # it failed, was not acked, and came back
        await ensure_streams(js)  # the bucket is back
        store = SettingsStore(js)

        async def stored() -> bool:
            return await store.get("dora") == update.settings

        await eventually(stored)

        await eventually(lambda: all_acked(js, subjects.COMMANDS_STREAM, USER_COMMANDS))


async def test_an_event_crafted_to_break_the_consumer_is_dead_lettered_and_the_rest_go_on(
    tmp_path: Path,
) -> None:
    """A forged event claiming a JSON body it does not have (FastStream decodes by content type
    before the handler runs), then the runtime's observation: the observation is acted on at
    once, the forgery is dead-lettered."""
    spec = ConversationSpec(initial_user_msg="Do the demo.")
    async with agent_stack(tmp_path, None) as stack, stack.conversation("fay", spec) as runtime:
        runtime.hold_commands = True
        await runtime.wait_for(lambda events: any(isinstance(e, CmdRunAction) for e in events))
        js: JetStreamContext = stack.js
        dead = await js.pull_subscribe(subjects.ALL_DEADLETTERS, stream=subjects.DEADLETTER_STREAM)
        # On a conversation of its own: a forged last event of this one would stop its appender.
        # On this conversation's partition: the consumer the observation comes through.
        forged_cid = next(
            cid
            for cid in (uuid.uuid4().hex for _ in range(1000))
            if partition_of(cid) == partition_of(runtime.cid)
        )
        forged = subjects.event_subject(forged_cid, CmdOutputObservation.__name__)
        await js.publish(forged, b"{not json", headers={"content-type": "application/json"})
        await runtime.answer_held()  # the observation follows the forgery, likely in its batch
        async with asyncio.timeout(5):  # well before the 30 s ack_wait would bring it back
            await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
        (letter,) = await dead.fetch(1, timeout=5)
        assert letter.data == b"{not json"
        durable = events_durable(runtime.cid)
        await eventually(lambda: all_acked(js, subjects.EVENTS_STREAM, durable))
