"""The runner's durable consumer against a real NATS: an event no retry can handle is given up
after `max_deliver` deliveries and kept as a dead letter; work longer than `ack_wait` (running,
or waiting in its conversation's lane) is kept alive, never redelivered; and the durable's
config follows the settings across restarts."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import CmdOutputObservation
from taskbus.contracts.inbound import REASON_HEADER, SUBJECT_HEADER
from taskbus.contracts.streams import last_message
from taskbus.runtime_runner.app import RuntimeRunnerService
from taskbus.runtime_runner.settings import RuntimeRunnerSettings

from .conftest import forwarding, fresh_runner_id, wait_for_runner_consumer
from .test_service import command, reply_to, start_runtime, wait_for

RETRY_SECONDS = 5.0  # app._RETRY_DELAY_SECONDS: the nak delay between two deliveries


def runner_settings(nats_url: str, tmp_path: Path, **fields: object) -> RuntimeRunnerSettings:
    defaults: dict[str, object] = {
        "nats_url": nats_url,
        "backend": "local",
        "workspace_root": str(tmp_path / "workspaces"),
        "no_change_seconds": 1.0,
        "command_seconds": 20.0,
        "runner_id": fresh_runner_id(),
    }
    return msgspec.convert({**defaults, **fields}, RuntimeRunnerSettings)


@asynccontextmanager
async def running(settings: RuntimeRunnerSettings, js: JetStreamContext) -> AsyncIterator[None]:
    """A runner service in this process, stopped on exit (its durable stays). The test forwards
    its work (`forwarding`), as session-manager would."""
    stop = asyncio.Event()
    task = asyncio.create_task(RuntimeRunnerService(settings).run(stop))
    await wait_for_runner_consumer(js, settings.runner_id)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def consumer(js: JetStreamContext, settings: RuntimeRunnerSettings) -> ConsumerInfo:
    return await js.consumer_info(subjects.RUNNER_WORK_STREAM, durable(settings))


def durable(settings: RuntimeRunnerSettings) -> str:
    return subjects.runtime_runner_durable(settings.runner_id)


async def dead_letter_of(js: JetStreamContext, subject: str, seconds: float) -> dict[str, str]:
    """The headers of the runner's dead letter of the message on `subject`, once it is kept."""
    sub = await js.subscribe(
        subjects.dead_letter_subject(subjects.RUNTIME_RUNNER), ordered_consumer=True
    )
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await sub.next_msg(timeout=seconds)
                if (message.headers or {}).get(SUBJECT_HEADER) == subject:
                    return dict(message.headers or {})
    finally:
        await sub.unsubscribe()


async def test_an_event_failing_every_delivery_is_given_up_after_max_deliver_and_kept(
    nats_url: str, tmp_path: Path, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A command whose conversation log holds a corrupt event after it: the reply check cannot
    read it, so every attempt fails. It is tried twice, then logged, dead-lettered and acked."""
    caplog.set_level(logging.ERROR, logger="taskbus.runtime_runner.app")
    settings = runner_settings(nats_url, tmp_path, max_deliver=2)
    async with forwarding(js, settings.runner_id):
        cid = uuid.uuid4().hex
        async with running(settings, js):
            pass  # the durable now exists; what follows is appended while no runner consumes
        await EventAppender(js).append(command(cid, "echo never"))
        await js.publish(subjects.event_subject(cid, "Corrupt"), b"\xff not an event")
        async with running(settings, js):
            action_subject = subjects.runner_work_subject(
                settings.runner_id, subjects.event_subject(cid, "CmdRunAction")
            )
            headers = await dead_letter_of(js, action_subject, seconds=RETRY_SECONDS + 10)
            assert headers[REASON_HEADER] == "failed on all 2 deliveries: DecodeError"
            given_up = await consumer(js, settings)
            # The dead letter is kept before the ack, which the server records a moment later.
            for _ in range(50):
                if given_up.num_ack_pending == 0:
                    break
                await asyncio.sleep(0.1)
                given_up = await consumer(js, settings)
            assert given_up.config.max_deliver == 2
            assert given_up.num_ack_pending == 0 and given_up.num_pending == 0
            # Past the next retry it would have had: delivered no more.
            await asyncio.sleep(RETRY_SECONDS + 1)
            later = await consumer(js, settings)
            assert later.delivered.consumer_seq == given_up.delivered.consumer_seq == 2
            assert later.num_ack_pending == 0
            assert (
                await last_message(js, subjects.event_subject(cid, "CmdOutputObservation")) is None
            )
    await js.delete_consumer(subjects.RUNNER_WORK_STREAM, durable(settings))
    assert any(
        "failed on all 2 deliveries; given up" in record.getMessage()
        and record.levelno == logging.ERROR
        for record in caplog.records
    )


async def test_work_longer_than_ack_wait_is_kept_alive_and_never_redelivered(
    nats_url: str, tmp_path: Path, js: JetStreamContext
) -> None:
    """With a one-second ack_wait, a four-second command and a second one queued behind it in
    its conversation's lane are each delivered once: `in_progress` keeps both alive."""
    settings = runner_settings(nats_url, tmp_path, ack_wait_seconds=1.0)
    cid = uuid.uuid4().hex
    appender = EventAppender(js)
    async with forwarding(js, settings.runner_id), running(settings, js):
        await start_runtime(js, appender, cid)
        slow = await appender.append(command(cid, "sleep 4; echo slow", blocking=True))
        queued = await appender.append(command(cid, "echo queued"))
        done = await wait_for(js, cid, reply_to(queued, CmdOutputObservation), seconds=20)
        assert isinstance(done, CmdOutputObservation) and done.content.strip() == "queued"
        first = await wait_for(js, cid, reply_to(slow, CmdOutputObservation))
        assert isinstance(first, CmdOutputObservation) and first.content.strip() == "slow"
        await asyncio.sleep(1.5)  # a redelivery due now would show
        info = await consumer(js, settings)
        assert info.config.ack_wait == 1.0
        # RuntimeRequested and the two commands, each delivered once, all acked.
        assert info.delivered.consumer_seq == 3
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
    await js.delete_consumer(subjects.RUNNER_WORK_STREAM, durable(settings))


async def test_the_durable_follows_the_settings_across_restarts(
    nats_url: str, tmp_path: Path, js: JetStreamContext
) -> None:
    settings = runner_settings(nats_url, tmp_path)
    async with running(settings, js):
        before = (await consumer(js, settings)).config
    assert (before.ack_wait, before.max_ack_pending, before.max_deliver) == (30.0, 512, 20)
    changed = msgspec.structs.replace(
        settings, ack_wait_seconds=7.0, max_ack_pending=9, max_deliver=3
    )
    async with running(changed, js):
        # The durable exists already: the restarted runner updates it as it starts.
        for _ in range(100):
            after = (await consumer(js, changed)).config
            if after.ack_wait != before.ack_wait:
                break
            await asyncio.sleep(0.1)
    assert (after.ack_wait, after.max_ack_pending, after.max_deliver) == (7.0, 9, 3)
    assert after.filter_subject == before.filter_subject == subjects.runner_work(settings.runner_id)
    await js.delete_consumer(subjects.RUNNER_WORK_STREAM, durable(settings))
