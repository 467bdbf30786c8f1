"""The runner through a real NATS JetStream: events in the log in, replies in the log out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    AnyEvent,
    CmdOutputChunk,
    CmdOutputObservation,
    CmdRunAction,
    CommandTimeout,
    ConversationDeleted,
    ErrorObservation,
    Event,
    EventSource,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeRequested,
    RuntimeStatusChanged,
    UnknownEvent,
    decode_event,
    encode_event,
)
from taskbus.contracts.runner_work import EVENT_SEQUENCE_HEADER
from taskbus.contracts.runners import SandboxIsolation
from taskbus.contracts.specs import Timeouts
from taskbus.contracts.status import RuntimeStatus
from taskbus.runtime_runner.app import (
    EventDispatcher,
    RuntimeRunnerService,
    in_flight_journal,
    sandbox_factory,
)
from taskbus.runtime_runner.backend import Backend
from taskbus.runtime_runner.replies import is_answered
from taskbus.runtime_runner.runner import RuntimeRunner, SandboxCapacity
from taskbus.runtime_runner.settings import RuntimeRunnerSettings

from .conftest import forwarding, fresh_runner_id, wait_for_runner_consumer


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> RuntimeRunnerSettings:
    return RuntimeRunnerSettings(
        nats_url=nats_url,
        backend="local",
        workspace_root=str(tmp_path / "workspaces"),
        no_change_seconds=1.0,
        command_seconds=10.0,
        runner_id=fresh_runner_id(),
    )


@pytest.fixture
async def service(
    settings: RuntimeRunnerSettings, js: JetStreamContext
) -> AsyncIterator[RuntimeRunnerService]:
    stop = asyncio.Event()
    runner_service = RuntimeRunnerService(settings)
    async with forwarding(js, settings.runner_id):
        task = asyncio.create_task(runner_service.run(stop))
        await wait_for_runner_consumer(js, settings.runner_id)
        yield runner_service
        stop.set()
        await asyncio.wait_for(task, 10)
    await js.delete_consumer(
        subjects.RUNNER_WORK_STREAM, subjects.runtime_runner_durable(settings.runner_id)
    )


async def read_log(js: JetStreamContext, conversation_id: str) -> list[AnyEvent]:
    sub = await js.subscribe(subjects.conversation_events(conversation_id), ordered_consumer=True)
    events: list[AnyEvent] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            event = decode_event(msg.data)
            assert not isinstance(event, UnknownEvent)
            events.append(event)
            if msg.metadata.num_pending == 0:
                return events
    finally:
        await sub.unsubscribe()


async def wait_for(
    js: JetStreamContext,
    conversation_id: str,
    found: Callable[[AnyEvent], bool],
    seconds: float = 10.0,
) -> AnyEvent:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        try:
            events = await read_log(js, conversation_id)
        except TimeoutError:  # a busy server was slow to deliver: read again
            continue
        for event in events:
            if found(event):
                return event
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"no matching event in {conversation_id}: {await read_log(js, conversation_id)}"
    )


def reply_to(event: Event, kind: type[Event]) -> Callable[[AnyEvent], bool]:
    return lambda candidate: isinstance(candidate, kind) and candidate.cause == event.id


def status(event: Event, wanted: RuntimeStatus) -> Callable[[AnyEvent], bool]:
    return lambda candidate: (
        isinstance(candidate, RuntimeStatusChanged)
        and candidate.cause == event.id
        and candidate.status == wanted
    )


def request_runtime(cid: str, **fields: object) -> RuntimeRequested:
    return RuntimeRequested(conversation_id=cid, source=EventSource.AGENT, user_id="u1", **fields)  # type: ignore[arg-type]


def command(cid: str, text: str, **fields: object) -> CmdRunAction:
    return CmdRunAction(conversation_id=cid, source=EventSource.AGENT, command=text, **fields)  # type: ignore[arg-type]


async def start_runtime(js: JetStreamContext, appender: EventAppender, cid: str) -> None:
    requested = await appender.append(request_runtime(cid))
    ready = await wait_for(js, cid, status(requested, RuntimeStatus.READY))
    assert isinstance(ready, RuntimeStatusChanged)
    assert ready.backend == "local"
    assert await asyncio.to_thread(Path(ready.workspace).is_dir)


@pytest.mark.usefixtures("service")
async def test_runtime_becomes_ready_and_runs_a_command(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    appender = EventAppender(js)
    requested = await appender.append(request_runtime(cid, timeouts=Timeouts(no_change_seconds=5)))
    await wait_for(js, cid, status(requested, RuntimeStatus.STARTING))
    ready = await wait_for(js, cid, status(requested, RuntimeStatus.READY))
    assert isinstance(ready, RuntimeStatusChanged)
    assert ready.sandbox_id and ready.workspace.endswith(cid)

    action = await appender.append(
        command(cid, "for i in 1 2 3; do echo line-$i; sleep 0.3; done; echo $((6*7))")
    )
    observation = await wait_for(js, cid, reply_to(action, CmdOutputObservation))
    assert isinstance(observation, CmdOutputObservation)
    assert observation.source == EventSource.ENVIRONMENT
    assert observation.content.split() == ["line-1", "line-2", "line-3", "42"]
    assert observation.exit_code == 0
    assert observation.timed_out == CommandTimeout.NONE
    chunks = [e for e in await read_log(js, cid) if isinstance(e, CmdOutputChunk)]
    assert chunks and all(c.cause == action.id and c.id < observation.id for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert "line-1" in "".join(c.content for c in chunks)


@pytest.mark.usefixtures("service")
async def test_action_without_a_runtime_gets_no_runtime(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    action = await EventAppender(js).append(command(cid, "echo hi"))
    error = await wait_for(js, cid, reply_to(action, ErrorObservation))
    assert isinstance(error, ErrorObservation)
    assert error.code == "no_runtime"


@pytest.mark.usefixtures("service")
async def test_failed_clone_is_an_error_without_credentials(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    requested = await EventAppender(js).append(
        request_runtime(cid, repository="https://bob:s3cret@127.0.0.1:9/repo.git")
    )
    failed = await wait_for(js, cid, status(requested, RuntimeStatus.ERROR))
    assert isinstance(failed, RuntimeStatusChanged)
    assert failed.reason.startswith("clone_failed: ")
    error = await wait_for(js, cid, reply_to(requested, ErrorObservation))
    assert isinstance(error, ErrorObservation) and error.code == "clone_failed"
    replies = [e for e in await read_log(js, cid) if e.source == EventSource.ENVIRONMENT]
    assert len(replies) == 3  # starting, the error, error status
    assert all("s3cret" not in repr(event) for event in replies)


@pytest.mark.usefixtures("service")
async def test_pause_resume_and_stop(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    appender = EventAppender(js)
    await start_runtime(js, appender, cid)

    def control(action: RuntimeControl) -> RuntimeControlRequested:
        return RuntimeControlRequested(conversation_id=cid, source=EventSource.AGENT, action=action)

    pause = await appender.append(control(RuntimeControl.PAUSE))
    await wait_for(js, cid, status(pause, RuntimeStatus.PAUSED))
    refused = await appender.append(command(cid, "echo while paused"))
    error = await wait_for(js, cid, reply_to(refused, ErrorObservation))
    assert isinstance(error, ErrorObservation) and error.code == "runtime_paused"

    resume = await appender.append(control(RuntimeControl.RESUME))
    await wait_for(js, cid, status(resume, RuntimeStatus.READY))
    works = await appender.append(command(cid, "echo resumed"))
    observation = await wait_for(js, cid, reply_to(works, CmdOutputObservation))
    assert isinstance(observation, CmdOutputObservation)
    assert observation.content.strip() == "resumed"

    stop = await appender.append(control(RuntimeControl.STOP))
    await wait_for(js, cid, status(stop, RuntimeStatus.STOPPED))
    gone = await appender.append(command(cid, "echo gone"))
    error = await wait_for(js, cid, reply_to(gone, ErrorObservation))
    assert isinstance(error, ErrorObservation) and error.code == "no_runtime"


@pytest.mark.usefixtures("service")
async def test_a_deleted_conversation_leaves_no_sandbox_and_no_files(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    appender = EventAppender(js)
    requested = await appender.append(request_runtime(cid))
    ready = await wait_for(js, cid, status(requested, RuntimeStatus.READY))
    assert isinstance(ready, RuntimeStatusChanged)
    wrote = await appender.append(command(cid, "echo secret > notes.txt && mkdir -p d/e"))
    await wait_for(js, cid, reply_to(wrote, CmdOutputObservation))
    workspace = Path(ready.workspace)
    assert await asyncio.to_thread((workspace / "notes.txt").is_file)

    deleted = await appender.append(
        ConversationDeleted(conversation_id=cid, source=EventSource.USER, reason="deleted")
    )
    removed = await wait_for(js, cid, status(deleted, RuntimeStatus.STOPPED))
    assert isinstance(removed, RuntimeStatusChanged) and removed.reason == "deleted"
    assert not await asyncio.to_thread(workspace.exists)
    assert not await asyncio.to_thread((workspace.parent / ".home" / cid).exists)
    gone = await appender.append(command(cid, "cat notes.txt"))
    error = await wait_for(js, cid, reply_to(gone, ErrorObservation))
    assert isinstance(error, ErrorObservation) and error.code == "no_runtime"


@pytest.mark.usefixtures("service")
async def test_conversations_run_concurrently(js: JetStreamContext) -> None:
    slow_cid, fast_cid = uuid.uuid4().hex, uuid.uuid4().hex
    appender = EventAppender(js)
    await asyncio.gather(
        start_runtime(js, appender, slow_cid), start_runtime(js, appender, fast_cid)
    )
    slow = await appender.append(command(slow_cid, "sleep 3; echo slow", blocking=True))
    fast = await appender.append(command(fast_cid, "echo fast"))
    fast_done = await wait_for(js, fast_cid, reply_to(fast, CmdOutputObservation), seconds=2.5)
    assert isinstance(fast_done, CmdOutputObservation) and fast_done.content.strip() == "fast"
    assert not any(
        reply_to(slow, CmdOutputObservation)(event) for event in await read_log(js, slow_cid)
    )
    slow_done = await wait_for(js, slow_cid, reply_to(slow, CmdOutputObservation))
    assert isinstance(slow_done, CmdOutputObservation) and slow_done.content.strip() == "slow"


async def test_is_answered_only_by_a_final_reply(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    appender = EventAppender(js)
    action = await appender.append(command(cid, "echo"))
    last = await js.get_last_msg(subjects.EVENTS_STREAM, subjects.conversation_events(cid))
    assert last.seq is not None
    assert not await is_answered(js, cid, action.id, last.seq)
    env = {"conversation_id": cid, "source": EventSource.ENVIRONMENT, "cause": action.id}
    await appender.append(CmdOutputChunk(**env, content="partial"))  # type: ignore[arg-type]
    await appender.append(command(cid, "another action"))
    assert not await is_answered(js, cid, action.id, last.seq)
    await appender.append(CmdOutputObservation(**env, content="", command="echo"))  # type: ignore[arg-type]
    assert await is_answered(js, cid, action.id, last.seq)
    assert not await is_answered(js, cid, action.id + 1, last.seq)


def local_runner(
    appender: EventAppender,
    settings: RuntimeRunnerSettings,
    capacity: SandboxCapacity | None = None,
) -> RuntimeRunner:
    """A runner of local sandboxes under bubblewrap, consuming nothing: the test hands it
    events."""
    return RuntimeRunner(
        appender,
        sandbox_factory(settings, Backend(SandboxIsolation.BUBBLEWRAP)),
        settings.max_output_bytes,
        in_flight_journal(settings),
        Path(settings.workspace_root),
        capacity=capacity,
    )


class WorkBench:
    """A runner's dispatcher fed by hand: `forward` puts a stored event on the runner's work
    subject with the sequence header given, as the session-manager's forwarder (or a forger)
    would, and dispatches what the runner's durable then delivers."""

    def __init__(self, js: JetStreamContext, settings: RuntimeRunnerSettings) -> None:
        self.js = js
        self.appender = EventAppender(js)
        self.runner = local_runner(self.appender, settings)
        self.rid = settings.runner_id
        self.dispatcher = EventDispatcher(
            js, self.appender, self.runner, self.rid, settings.max_deliver
        )

    async def forward(self, cid: str, kind: str, data: bytes, sequence_header: str) -> None:
        work_subject = subjects.runner_work_subject(self.rid, subjects.event_subject(cid, kind))
        await self.js.publish(
            work_subject,
            data,
            stream=subjects.RUNNER_WORK_STREAM,
            headers={EVENT_SEQUENCE_HEADER: sequence_header},
        )
        (message,) = await self._consumer.fetch(1, timeout=2)
        await self.dispatcher.dispatch(message)

    async def __aenter__(self) -> WorkBench:
        self._consumer = await self.js.pull_subscribe(
            subjects.runner_work(self.rid),
            durable=subjects.runtime_runner_durable(self.rid),
            stream=subjects.RUNNER_WORK_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.dispatcher.cancel()
        await self.runner.close()
        durable = subjects.runtime_runner_durable(self.rid)
        await self.js.delete_consumer(subjects.RUNNER_WORK_STREAM, durable)


async def test_a_redelivered_action_does_not_run_twice(
    js: JetStreamContext, settings: RuntimeRunnerSettings
) -> None:
    """The same stored action dispatched twice (as after a crash before the ack) runs once."""
    cid = uuid.uuid4().hex
    async with WorkBench(js, settings) as bench:
        await bench.runner.handle(await bench.appender.append(request_runtime(cid)))
        action = await bench.appender.append(command(cid, "echo ran >> ran.txt; cat ran.txt"))
        logged = await js.get_last_msg(
            subjects.EVENTS_STREAM, subjects.event_subject(cid, "CmdRunAction")
        )
        for _ in range(2):
            # Forwarded again past the dedupe window (as by a forwarder that crashed then).
            await bench.forward(cid, "CmdRunAction", logged.data or b"", str(logged.seq))
            await wait_for(js, cid, reply_to(action, CmdOutputObservation))
            await asyncio.sleep(0.3)  # let a wrong second run show up
        observations = [
            e for e in await read_log(js, cid) if reply_to(action, CmdOutputObservation)(e)
        ]
    assert len(observations) == 1
    assert isinstance(observations[0], CmdOutputObservation)
    assert observations[0].content.strip() == "ran"


@pytest.mark.parametrize(
    ("header", "id_shift"),
    [("ahead", 0), ("behind", 0), ("true", 5)],
    ids=["sequence-ahead", "sequence-behind", "id-forged"],
)
async def test_forged_work_cannot_misplace_the_answer(
    js: JetStreamContext, settings: RuntimeRunnerSettings, header: str, id_shift: int
) -> None:
    """Work whose sequence header lies (far ahead of the log, or behind the action), or whose
    event claims another id than the one it is stored under, is still answered right after the
    log's real last event, the ids dense: where an answer goes is read from the log, never taken
    from what the work message says."""
    cid = uuid.uuid4().hex
    async with WorkBench(js, settings) as bench:
        await bench.runner.handle(await bench.appender.append(request_runtime(cid)))
        other = EventAppender(js)  # another writer: the runner's cached tail falls behind
        action = await other.append(command(cid, "echo answered"))
        logged = await js.get_last_msg(
            subjects.EVENTS_STREAM, subjects.event_subject(cid, "CmdRunAction")
        )
        assert logged.seq is not None
        sequence = {"ahead": logged.seq + 10**6, "behind": 1, "true": logged.seq}[header]
        claimed = msgspec.structs.replace(action, id=action.id + id_shift)
        await bench.forward(cid, "CmdRunAction", encode_event(claimed), str(sequence))
        await wait_for(js, cid, lambda e: isinstance(e, CmdOutputObservation))
        log = await read_log(js, cid)
    assert [e.id for e in log] == list(range(len(log)))
    (answer,) = [e for e in log if isinstance(e, CmdOutputObservation)]
    assert answer.id == action.id + 1


async def test_a_full_runner_makes_a_start_wait_for_a_given_back_sandbox_or_refuses_it(
    js: JetStreamContext, settings: RuntimeRunnerSettings
) -> None:
    """At its maximum of sandboxes a start waits for one to be given back; none within the
    wait is a typed `runner_full` error, never a sandbox over the bound."""
    appender = EventAppender(js)
    runner = local_runner(appender, settings, SandboxCapacity(max_sandboxes=1, wait_seconds=1.0))
    first, refused, waiting = (uuid.uuid4().hex for _ in range(3))
    try:
        await runner.handle(await appender.append(request_runtime(first)))
        assert list(runner.live_sandboxes()) == [first]
        await runner.handle(refused_request := await appender.append(request_runtime(refused)))
        error = await wait_for(js, refused, reply_to(refused_request, ErrorObservation))
        assert isinstance(error, ErrorObservation) and error.code == "runner_full"
        failed = await wait_for(js, refused, status(refused_request, RuntimeStatus.ERROR))
        assert isinstance(failed, RuntimeStatusChanged) and failed.reason.startswith("runner_full")
        assert list(runner.live_sandboxes()) == [first]
        # A start that waits gets the sandbox the first conversation gives back.
        waiting_request = await appender.append(request_runtime(waiting))
        start = asyncio.create_task(runner.handle(waiting_request))
        await asyncio.sleep(0.2)
        assert not start.done() and runner.room() == 0
        stop = RuntimeControlRequested(
            conversation_id=first,
            source=EventSource.ENVIRONMENT,
            action=RuntimeControl.STOP,
            reason="idle",
        )
        await runner.handle(await appender.append(stop))
        await start
        await wait_for(js, waiting, status(waiting_request, RuntimeStatus.READY))
        assert list(runner.live_sandboxes()) == [waiting]
    finally:
        await runner.close(remove_sandboxes=True)
