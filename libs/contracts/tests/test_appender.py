"""Dense ids under concurrent writers, against a real JetStream."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender, StaleAppend
from taskbus.contracts.events import EventSource, ThinkAction, decode_event
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer


async def _ids_in_log(js: JetStreamContext, conversation_id: str) -> list[int]:
    sub = await js.subscribe(subjects.conversation_events(conversation_id), ordered_consumer=True)
    info = await js.stream_info(subjects.EVENTS_STREAM)
    ids: list[int] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            event = decode_event(msg.data)
            ids.append(event.id)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    assert info.state.messages > 0
    return ids


def _think(conversation_id: str, text: str) -> ThinkAction:
    return ThinkAction(conversation_id=conversation_id, source=EventSource.AGENT, thought=text)


async def test_first_append_gets_id_zero_and_ids_follow(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    appender = EventAppender(js)
    first = await appender.append(_think(cid, "a"))
    rest = await appender.append_all([_think(cid, "b"), _think(cid, "c")])
    assert [first.id, *[e.id for e in rest]] == [0, 1, 2]
    assert await _ids_in_log(js, cid) == [0, 1, 2]


async def test_two_appenders_in_one_process_never_collide(js: JetStreamContext) -> None:
    cid = uuid.uuid4().hex
    a, b = EventAppender(js), EventAppender(js)

    async def write(appender: EventAppender, tag: str) -> list[int]:
        return [(await appender.append(_think(cid, f"{tag}{i}"))).id for i in range(100)]

    ids_a, ids_b = await asyncio.gather(write(a, "a"), write(b, "b"))
    assert sorted(ids_a + ids_b) == list(range(200))
    assert await _ids_in_log(js, cid) == list(range(200))


_WRITER = """
import asyncio, sys
import nats
from taskbus.contracts.appender import EventAppender, StaleAppend
from taskbus.contracts.events import EventSource, ThinkAction

async def main(url, cid, tag, count):
    nc = await nats.connect(url)
    appender = EventAppender(nc.jetstream())
    for i in range(count):
        await appender.append(
            ThinkAction(conversation_id=cid, source=EventSource.AGENT, thought=f"{tag}-{i}")
        )
    await nc.drain()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def test_two_processes_append_500_each_without_gap_or_duplicate(
    js: JetStreamContext, nats_url: str
) -> None:
    cid = uuid.uuid4().hex
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, nats_url, cid, tag, "500"
        )
        for tag in "ab"
    ]
    exit_codes = await asyncio.gather(*(worker.wait() for worker in workers))
    assert exit_codes == [0, 0]
    ids = await _ids_in_log(js, cid)
    assert ids == list(range(1000))
    # Every writer's events all made it, each exactly once.
    sub = await js.subscribe(subjects.conversation_events(cid), ordered_consumer=True)
    thoughts = []
    for _ in range(1000):
        msg = await sub.next_msg(timeout=2)
        thoughts.append(msgspec.json.decode(msg.data)["thought"])
    await sub.unsubscribe()
    assert sorted(thoughts) == sorted(f"{t}-{i}" for t in "ab" for i in range(500))


async def test_many_conversations_at_once_on_one_connection_keep_dense_ids(
    js: JetStreamContext,
) -> None:
    """Appends of 30 conversations are in flight together, from two appenders sharing one
    connection (each with its own acks): every ack reaches its own append, so every
    conversation ends with ids 0..39, each event stored once."""
    cids = [uuid.uuid4().hex for _ in range(30)]
    a, b = EventAppender(js), EventAppender(js)

    async def write(appender: EventAppender, cid: str, tag: str) -> list[int]:
        return [(await appender.append(_think(cid, f"{tag}{i}"))).id for i in range(20)]

    results = await asyncio.gather(
        *(write(appender, cid, tag) for cid in cids for appender, tag in ((a, "a"), (b, "b")))
    )
    for n, cid in enumerate(cids):
        assert sorted(results[2 * n] + results[2 * n + 1]) == list(range(40))
        assert await _ids_in_log(js, cid) == list(range(40))


async def test_an_outcome_waits_out_a_server_restart_and_is_stored_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`append_until_stored` through nats-server down and back on the same store: the record of
    something done is stored once, not lost and not raised (its caller would do it again)."""
    server = NatsServer(tmp_path / "nats").start()
    client = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = client.jetstream(timeout=0.5)
        await ensure_streams(js)
        cid = uuid.uuid4().hex
        appender = EventAppender(js)
        await appender.append(_think(cid, "before"))
        server.stop()
        with caplog.at_level(logging.WARNING, logger="taskbus.contracts.appender"):
            outcome = asyncio.create_task(appender.append_until_stored(_think(cid, "done")))
            await asyncio.sleep(2.0)
            assert not outcome.done()
            assert "trying again" in caplog.text  # it failed while the server was down
        server.start()
        stored = await asyncio.wait_for(outcome, 30)
        assert stored.id == 1
        assert await _ids_in_log(js, cid) == [0, 1]
    finally:
        await client.close()
        server.stop()


async def test_an_outcome_the_log_refuses_for_good_is_not_retried(js: JetStreamContext) -> None:
    too_big = _think(uuid.uuid4().hex, "x" * 2_000_000)  # over the server's max_payload
    with pytest.raises(nats.errors.MaxPayloadError):
        await asyncio.wait_for(EventAppender(js).append_until_stored(too_big), 10)


async def test_a_decision_on_a_state_the_log_has_left_appends_nothing(
    js: JetStreamContext,
) -> None:
    """What was decided on the log up to event 0 is refused once another writer appended event
    1, whether it is one event or several, and whether this appender's cached tail knew of the
    other write or not."""
    cid = uuid.uuid4().hex
    mine, other = EventAppender(js), EventAppender(js)
    await mine.append(_think(cid, "seen"))
    await other.append(_think(cid, "not seen by the decider"))
    with pytest.raises(StaleAppend):
        await mine.append_decision([_think(cid, "decided")], after=0)
    with pytest.raises(StaleAppend):
        await mine.append_decision([_think(cid, "one"), _think(cid, "two")], after=0)
    assert await _ids_in_log(js, cid) == [0, 1]
    stored = await mine.append_decision([_think(cid, "one"), _think(cid, "two")], after=1)
    assert [e.id for e in stored] == [2, 3]
    with pytest.raises(StaleAppend):  # the first event of a conversation expects an empty log
        await EventAppender(js).append_decision([_think(cid, "created twice")], after=-1)
    assert await _ids_in_log(js, cid) == [0, 1, 2, 3]


async def test_a_decision_is_stored_whole_or_not_at_all(js: JetStreamContext) -> None:
    """A decision cut off between its events (here the client refuses the third for its size
    after sending two) leaves none of them: the server drops a batch never committed."""
    cid = uuid.uuid4().hex
    appender = EventAppender(js)
    await appender.append(_think(cid, "before"))
    cut = [_think(cid, "a"), _think(cid, "b"), _think(cid, "x" * 2_000_000)]
    with pytest.raises(nats.errors.MaxPayloadError):
        await appender.append_decision(cut, after=0)
    after_cut = await appender.append_decision([_think(cid, "c"), _think(cid, "d")], after=0)
    assert [e.thought for e in after_cut] == ["c", "d"]
    assert await _ids_in_log(js, cid) == [0, 1, 2]


async def test_a_decision_stored_by_a_try_whose_answer_was_lost_is_not_stored_twice(
    js: JetStreamContext,
) -> None:
    """A writer that tries the same decision again (its first answer lost: a timeout, or a
    deposed leader's "wrong last sequence" while the new leader stored it) gets the stored
    copy, not a second one or a refusal."""
    cid = uuid.uuid4().hex
    first, retry = EventAppender(js), EventAppender(js)
    await retry.append(_think(cid, "before"))  # the retrying writer's tail: event 0
    decision = [_think(cid, "one"), _think(cid, "two")]
    stored = await first.append_decision(decision, after=0)
    again = await retry.append_decision(decision, after=0)
    assert again == stored
    assert await _ids_in_log(js, cid) == [0, 1, 2]


async def test_an_appender_told_of_a_later_event_appends_after_it_in_one_publish(
    js: JetStreamContext,
) -> None:
    """The runner reads the log's last event before answering an action: shown it (`saw`),
    its appender places the answer right after it at once. Not shown, its cached tail (its own
    last append) is behind, and the first publish is refused."""
    cid = uuid.uuid4().hex
    runner, agent = EventAppender(js), EventAppender(js)
    await runner.append(_think(cid, "runner's own"))  # cached here: id 0
    action = await agent.append(_think(cid, "the action"))
    last = await js.get_last_msg(subjects.EVENTS_STREAM, subjects.conversation_events(cid))
    assert last.seq is not None
    older = await js.get_msg(subjects.EVENTS_STREAM, last.seq - 1)
    runner.saw(cid, last)
    runner.saw(cid, older)  # an older one changes nothing
    answer, published = await _published(js, runner, _think(cid, "the answer"))
    assert answer.id == action.id + 1
    assert published == [answer.id]

    await agent.append(_think(cid, "unseen"))  # the runner is not told of this one
    late, published = await _published(js, runner, _think(cid, "after an unseen event"))
    assert published == [late.id - 1, late.id]  # refused on the stale tail, then placed
    assert await _ids_in_log(js, cid) == [0, 1, 2, 3, 4]


async def _published(
    js: JetStreamContext, appender: EventAppender, event: ThinkAction
) -> tuple[ThinkAction, list[int]]:
    """`event` appended, and the id of every publish it took: a core subscription sees the
    publishes the stream refused too."""
    published: list[int] = []

    async def noted(msg: Msg) -> None:
        published.append(decode_event(msg.data).id)

    tap = await js._nc.subscribe(subjects.conversation_events(event.conversation_id), cb=noted)
    try:
        appended = await appender.append(event)
        await js._nc.flush()
    finally:
        await tap.unsubscribe()
    return appended, published
