"""Sandboxes on runners, seen from session-manager: each is placed on a live runner with room
(the choice is in the log), its actions go to that runner's own subject, and when the runner
goes silent its conversations get `RuntimeLost` and then fail, or restart on another runner when
workspaces are on shared storage. The fake runtimes play the runners' part from the log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.events import (
    CmdRunAction,
    ConversationStatusChanged,
    ErrorObservation,
    RuntimeLost,
    RuntimeRequested,
)
from taskbus.contracts.runners import encode_runner_info
from taskbus.contracts.status import ConversationStatus
from taskbus.session_manager.app import running_session_manager
from taskbus.session_manager.decide import RUNTIME_LOST_REASON
from taskbus.session_manager.runner_directory import RunnerDirectory

from .conftest import runner_info
from .test_agent_loop import status_reached
from .test_dependencies import world

BEAT_SECONDS = 0.3
# More free slots than the conftest's never-beating fake runner (16), so these runners win.
ROOMY = 100


@contextlib.asynccontextmanager
async def beating(
    js: JetStreamContext, runner_id: str, slots: int = ROOMY, sandboxes: int = 0
) -> AsyncIterator[asyncio.Task[None]]:
    """A runner's registration and heartbeat; cancel the task and it falls silent."""
    bucket = await js.key_value(subjects.RUNNERS_BUCKET)
    info = runner_info(runner_id, slots, sandboxes)

    async def beat() -> None:
        while True:
            await bucket.put(runner_id, encode_runner_info(info))
            await asyncio.sleep(BEAT_SECONDS)

    task = asyncio.create_task(beat())
    await asyncio.sleep(0)  # the first beat is in before anything is placed
    try:
        yield task
    finally:
        task.cancel()


async def test_a_sandbox_goes_to_the_runner_with_room_and_its_actions_to_that_runners_subject(
    tmp_path: Path,
) -> None:
    async with (
        world(tmp_path) as w,
        beating(w.js, "full", slots=4, sandboxes=4),
        beating(w.js, "roomy"),
        running_session_manager(w.settings),
    ):
        (runtime,) = await w.runtimes(1)
        await w.create(runtime)
        await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
        (requested,) = runtime.of(RuntimeRequested)
        assert isinstance(requested, RuntimeRequested) and requested.runner_id == "roomy"
        (action,) = runtime.of(CmdRunAction)
        logged = await w.js.get_last_msg(
            subjects.EVENTS_STREAM, subjects.event_subject(runtime.cid, "CmdRunAction")
        )
        work = await w.js.get_last_msg(
            subjects.RUNNER_WORK_STREAM,
            subjects.runner_work_subject("roomy", logged.subject or ""),
        )
        assert work.data == logged.data  # byte for byte
        assert (work.headers or {})["Nats-Msg-Id"] == f"{runtime.cid}:{action.id}"
        # Nothing for the full runner.
        info = await w.js.stream_info(
            subjects.RUNNER_WORK_STREAM, subjects_filter="taskbus.runner.full.>"
        )
        assert not info.state.subjects


async def test_a_silent_runners_conversation_fails_with_runtime_lost_and_its_action_answered(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        settings = msgspec.structs.replace(w.settings, runner_lost_seconds=1.5)
        async with beating(w.js, "doomed") as heartbeat, running_session_manager(settings):
            (runtime,) = await w.runtimes(1)
            runtime.hold_commands = True  # the command is running when the runner dies
            await w.create(runtime)
            await runtime.wait_for(lambda events: any(isinstance(e, CmdRunAction) for e in events))
            heartbeat.cancel()
            await runtime.wait_for(status_reached(ConversationStatus.ERROR))
            (action,) = runtime.of(CmdRunAction)
            (lost,) = runtime.of(RuntimeLost)
            assert isinstance(lost, RuntimeLost) and lost.runner_id == "doomed"
            assert "not on shared storage" in lost.reason
            (answer,) = [e for e in runtime.of(ErrorObservation) if e.cause == action.id]
            assert isinstance(answer, ErrorObservation) and answer.code == RUNTIME_LOST_REASON
            error = runtime.of(ConversationStatusChanged)[-1]
            assert isinstance(error, ConversationStatusChanged)
            assert error.reason == RUNTIME_LOST_REASON
            assert len(runtime.of(RuntimeRequested)) == 1  # not restarted anywhere
            assert [e.id for e in runtime.events] == list(range(len(runtime.events)))


async def test_with_shared_workspaces_a_silent_runners_conversation_restarts_elsewhere(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        settings = msgspec.structs.replace(
            w.settings, runner_lost_seconds=1.5, shared_workspaces=True
        )
        async with (
            beating(w.js, "first") as first,
            beating(w.js, "second", slots=ROOMY - 1) as second,
            running_session_manager(settings),
        ):
            (runtime,) = await w.runtimes(1)
            runtime.hold_commands = True
            await w.create(runtime)
            await runtime.wait_for(lambda events: any(isinstance(e, CmdRunAction) for e in events))
            (placed,) = runtime.of(RuntimeRequested)
            assert isinstance(placed, RuntimeRequested) and placed.runner_id == "first"
            first.cancel()
            await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
            assert not second.done()
            (lost,) = runtime.of(RuntimeLost)
            assert isinstance(lost, RuntimeLost) and lost.runner_id == "first"
            replaced = runtime.of(RuntimeRequested)[-1]
            assert isinstance(replaced, RuntimeRequested) and replaced.runner_id == "second"
            assert lost.id < replaced.id
            (action,) = runtime.of(CmdRunAction)  # answered as lost, never sent again
            (answer,) = [e for e in runtime.of(ErrorObservation) if e.cause == action.id]
            assert isinstance(answer, ErrorObservation) and answer.code == RUNTIME_LOST_REASON


async def test_silence_a_held_up_session_manager_did_not_watch_is_no_runner_lost(
    tmp_path: Path,
) -> None:
    """A session-manager held up (SIGSTOP, starvation) for longer than `lost_after` has seen
    no silence: on waking it gives every runner a fresh `lost_after` rather than fail the
    conversations of runners that beat all along. Silence it watches still counts."""
    async with world(tmp_path) as w:
        now = 1000.0
        directory = RunnerDirectory(w.js, lost_after=15, placement_wait=1, clock=lambda: now)
        async with beating(w.js, "alive"), beating(w.js, "quiet") as quiet:
            await directory.refresh()
            quiet.cancel()  # a runner that really goes silent
            now += 60  # this process is held up for a minute
            await directory.refresh()
            assert not directory.is_lost("alive") and not directory.is_lost("quiet")
            for _ in range(8):  # then it watches, reading every 2 s
                await asyncio.sleep(2 * BEAT_SECONDS)  # "alive" beats in between
                now += 2
                await directory.refresh()
            assert not directory.is_lost("alive")
            assert directory.is_lost("quiet")  # silent for the 16 s it watched
