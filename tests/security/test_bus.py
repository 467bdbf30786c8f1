"""The bus, attacked from inside: no credential, the gateway's credential, and forged messages
sent with a service's own credential (a bug or a stolen password), against a real stack.

Issue 8 found NATS open to anyone, and a `ConversationDeleted` whose conversation id was a path
made the runner delete a directory on the host. Each attack here must change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyNotFoundError, NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.bus import BusCredential, connect, inbox_prefix
from taskbus.contracts.commands import (
    CommandVerdict,
    CreateConversation,
    DeleteConversation,
    PauseConversation,
    command_subject,
    encode_command,
    encode_verdict,
)
from taskbus.contracts.events import (
    CmdRunAction,
    ConversationDeleted,
    ConversationRejected,
    ConversationStatusChanged,
    EventSource,
    encode_event,
)
from taskbus.contracts.inbound import REASON_HEADER, SUBJECT_HEADER
from taskbus.contracts.observability_health import health_key
from taskbus.contracts.runner_work import EVENT_SEQUENCE_HEADER
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools import bus_auth
from taskbus.devtools.launcher import LOCAL_USER
from taskbus.gateway.conversations import command_msg_id, conversation_id_for

from ..conftest import Stack, running_stack

pytestmark = pytest.mark.slow

# A denied publish is never answered: the request times out after this.
DENIED_SECONDS = 1.0
DEAD_LETTER_SECONDS = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("bus")) as running:
        yield running


@contextlib.asynccontextmanager
async def bus_as(stack: Stack, user: str) -> AsyncIterator[Client]:
    nc = await connect(
        stack.nats_url, f"attacker-as-{user}", stack.bus_credential(user), allow_reconnect=False
    )
    try:
        yield nc
    finally:
        await nc.close()


async def conversation(stack: Stack) -> str:
    async with stack.client() as api:
        created = await api.post("/api/conversations", json={"initial_user_msg": "hi"})
        assert created.status_code in (200, 201), created.text
        return str(created.json()["conversation_id"])


async def the_runner(stack: Stack) -> str:
    """The id of the stack's one runner (its registration)."""
    async with bus_as(stack, bus_auth.ADMIN) as nc:
        (runner_id,) = await (await nc.jetstream().key_value(subjects.RUNNERS_BUCKET)).keys()
        return str(runner_id)


async def stored_events(stack: Stack, conversation_id: str) -> list[bytes]:
    """Every event of the conversation as stored in the log (read as the admin)."""
    found = []
    async with bus_as(stack, bus_auth.ADMIN) as nc:
        js = nc.jetstream()
        seq = 1
        with contextlib.suppress(NotFoundError):
            while True:
                message = await js.get_msg(
                    subjects.EVENTS_STREAM,
                    seq,
                    subject=subjects.conversation_events(conversation_id),
                    next=True,
                    direct=True,
                )
                assert message.seq is not None and message.data is not None
                found.append(message.data)
                seq = message.seq + 1
    return found


async def test_nats_refuses_connections_without_or_with_wrong_credentials(stack: Stack) -> None:
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(stack.nats_url, allow_reconnect=False, max_reconnect_attempts=0)
    wrong = BusCredential(user=bus_auth.ADMIN, password="guessed")
    with pytest.raises((nats.errors.Error, OSError)):
        await connect(stack.nats_url, "guesser", wrong, allow_reconnect=False)
    # The credential files are the operator's alone.
    for user in bus_auth.USERS:
        mode = bus_auth.credential_file(stack.data_dir / "bus", user).stat().st_mode
        assert mode & 0o077 == 0, oct(mode)
    assert (stack.data_dir / "bus" / "nats.conf").stat().st_mode & 0o077 == 0


async def test_the_gateway_cannot_append_an_event(stack: Stack) -> None:
    cid = await conversation(stack)
    forged = ConversationStatusChanged(
        conversation_id=cid,
        source=EventSource.ENVIRONMENT,
        id=10_000,
        status=ConversationStatus.FINISHED,
    )
    subject = subjects.event_subject(cid, forged.kind)
    async with bus_as(stack, bus_auth.GATEWAY) as nc:
        with pytest.raises(TimeoutError):
            await nc.jetstream().publish(subject, encode_event(forged), timeout=DENIED_SECONDS)
        await nc.publish(subject, encode_event(forged))  # fire and forget, no ack wanted
        await nc.flush()
    await asyncio.sleep(0.5)
    stored = await stored_events(stack, cid)
    assert stored and encode_event(forged) not in stored


async def test_the_gateway_writes_no_bucket_but_its_webhooks_and_administers_no_stream(
    stack: Stack,
) -> None:
    async with bus_as(stack, bus_auth.ADMIN) as admin:
        settings = await admin.jetstream().key_value(subjects.SETTINGS_BUCKET)
        await settings.put("victim", b'{"llm_model": "theirs"}')
    runner_id = await the_runner(stack)
    runner_durable = subjects.runtime_runner_durable(runner_id)
    async with bus_as(stack, bus_auth.GATEWAY) as nc:
        js = nc.jetstream(timeout=2)  # a denied request is never answered: wait 2 s, not 5
        for bucket in (
            subjects.SETTINGS_BUCKET,
            subjects.CONVERSATIONS_BUCKET,
            subjects.RUNNERS_BUCKET,
            subjects.HEALTH_BUCKET,  # a forged heartbeat would hide a dead service
        ):
            kv = await js.key_value(bucket)  # reading is allowed
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(kv.put("victim", b'{"llm_model": "mine"}'), 2)
        with pytest.raises(TimeoutError):
            await js.delete_stream(subjects.EVENTS_STREAM)
        with pytest.raises(TimeoutError):
            await js.purge_stream(subjects.EVENTS_STREAM)
        # Taking the runner's durable would starve it of actions.
        with pytest.raises(TimeoutError):
            await js.add_consumer(
                subjects.RUNNER_WORK_STREAM,
                ConsumerConfig(durable_name=runner_durable, name=None),
            )
        # The ephemeral-only create subject the gateway may use refuses a named consumer.
        reply = await nc.request(
            f"$JS.API.CONSUMER.CREATE.{subjects.EVENTS_STREAM}",
            json.dumps(
                {
                    "stream_name": subjects.EVENTS_STREAM,
                    "config": {
                        "durable_name": "stolen",
                        "ack_policy": "explicit",
                    },
                }
            ).encode(),
            timeout=5,
        )
        assert "error" in json.loads(reply.data)
    # Nor can it read another service's inboxes (where JetStream answers that service).
    async with bus_as(stack, bus_auth.GATEWAY) as nc:
        await nc.subscribe(f"{inbox_prefix(bus_auth.SESSION_MANAGER)}.>")
        await nc.flush(timeout=2)
        await asyncio.sleep(0.5)
        assert "permissions violation" in str(nc.last_error).lower()
    async with bus_as(stack, bus_auth.ADMIN) as admin:
        js = admin.jetstream()
        entry = await (await js.key_value(subjects.SETTINGS_BUCKET)).get("victim")
        assert entry.value == b'{"llm_model": "theirs"}'
        for bucket in (subjects.CONVERSATIONS_BUCKET, subjects.RUNNERS_BUCKET):
            with pytest.raises(KeyNotFoundError):
                await (await js.key_value(bucket)).get("victim")
        consumer = await js.consumer_info(subjects.RUNNER_WORK_STREAM, runner_durable)
        assert consumer.config.filter_subject == subjects.runner_work(runner_id)  # its own
        assert (await js.stream_info(subjects.EVENTS_STREAM)).state.messages > 0


async def test_no_other_service_can_steal_a_partition_a_slot_or_a_partitions_durable(
    stack: Stack,
) -> None:
    """A forged lease would make session-manager give its partitions up; a forged admission
    ledger would admit past every limit; a forged snapshot (a state matching the log's position
    but not its content) would lift a budget or put words in the agent's history; a taken
    partition durable would starve its holder."""
    lease_key = "session_manager.p0"
    snapshot_key = "0123456789abcdef0123456789abcdef"

    async def attempt(user: str) -> None:
        async with bus_as(stack, user) as nc:
            js = nc.jetstream()
            for bucket, key in (
                (subjects.PARTITIONS_BUCKET, lease_key),
                (subjects.ADMISSION_BUCKET, "ledger"),
                (subjects.SNAPSHOTS_BUCKET, snapshot_key),
            ):
                kv = await js.key_value(bucket)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(kv.put(key, b"forged"), 2)
            with pytest.raises(TimeoutError):
                await js.add_consumer(
                    subjects.EVENTS_STREAM,
                    ConsumerConfig(
                        durable_name=subjects.session_manager_events_durable(0), name=None
                    ),
                )

    # Each user's denials wait out their timeouts: side by side, not one user after another.
    await asyncio.gather(
        *map(attempt, (bus_auth.GATEWAY, bus_auth.RUNTIME_RUNNER, bus_auth.EVENT_STORE))
    )
    async with bus_as(stack, bus_auth.ADMIN) as admin:
        js = admin.jetstream()
        lease = await (await js.key_value(subjects.PARTITIONS_BUCKET)).get(lease_key)
        assert lease.value and lease.value != b"forged"  # still session-manager's
        with contextlib.suppress(KeyNotFoundError):
            ledger = await (await js.key_value(subjects.ADMISSION_BUCKET)).get("ledger")
            assert ledger.value != b"forged"
        with pytest.raises(KeyNotFoundError):
            await (await js.key_value(subjects.SNAPSHOTS_BUCKET)).get(snapshot_key)
        durable = subjects.session_manager_events_durable(0)
        consumer = await js.consumer_info(subjects.EVENTS_STREAM, durable)
        assert consumer.config.filter_subject == subjects.partition_events(0)


async def test_no_service_can_slip_a_forged_delivery_into_another_services_inbox(
    stack: Stack,
) -> None:
    """A pull consumer takes whatever reaches its inbox as JetStream's delivery, and trusts its
    reply subject (the ack subject, with the count of messages still pending): a service that
    could publish there could hand another one events the log never held."""
    victims = (bus_auth.SESSION_MANAGER, bus_auth.EVENT_STORE, bus_auth.RUNTIME_RUNNER)
    forged_ack = f"$JS.ACK.{subjects.EVENTS_STREAM}.forged.1.1.1.0.999999"
    async with bus_as(stack, bus_auth.ADMIN) as admin:
        arrived: list[str] = []

        async def caught(msg: Msg) -> None:
            arrived.append(msg.subject)

        for victim in victims:
            await admin.subscribe(f"{inbox_prefix(victim)}.>", cb=caught)
        await admin.flush()
        for attacker in (bus_auth.GATEWAY, bus_auth.RUNTIME_RUNNER, bus_auth.SESSION_MANAGER):
            async with bus_as(stack, attacker) as nc:
                for victim in victims:
                    if victim == attacker:
                        continue
                    await nc.publish(f"{inbox_prefix(victim)}.forged", b"{}", reply=forged_ack)
                await nc.flush(timeout=2)
                await asyncio.sleep(0.3)
                assert "permissions violation" in str(nc.last_error).lower(), attacker
        await asyncio.sleep(0.5)
        assert not [subject for subject in arrived if subject.endswith(".forged")]
        assert arrived, "the admin's tap hears the services' own deliveries, so it would hear these"


async def test_no_service_can_forge_another_services_health(stack: Stack) -> None:
    """A forged heartbeat would show a dead service as ready in /api/health (or a live one as
    not ready): each service writes its own entries and nobody else's."""
    services = (bus_auth.SESSION_MANAGER, bus_auth.RUNTIME_RUNNER, bus_auth.EVENT_STORE)

    async def attempt(user: str) -> None:
        async with bus_as(stack, user) as nc:
            kv = await nc.jetstream().key_value(subjects.HEALTH_BUCKET)
            for other in (s for s in (*services, bus_auth.GATEWAY) if s != user):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(kv.put(health_key(other, "forged"), b"{}"), 2)

    await asyncio.gather(*map(attempt, services))
    async with bus_as(stack, bus_auth.ADMIN) as admin:
        kv = await admin.jetstream().key_value(subjects.HEALTH_BUCKET)
        keys = await kv.keys()
        assert keys and not [key for key in keys if key.endswith(".forged")]


async def test_no_other_service_can_give_a_runner_work_or_fake_a_runners_heartbeat(
    stack: Stack,
) -> None:
    """Forged work would run a command in someone's sandbox without it being in the log; a
    forged heartbeat would keep a dead runner's conversations waiting, or draw placements."""
    cid = await conversation(stack)
    forged = CmdRunAction(
        conversation_id=cid, source=EventSource.AGENT, id=10_000, command="touch /tmp/owned"
    )
    event_subject = subjects.event_subject(cid, forged.kind)
    work_subject = subjects.runner_work_subject(await the_runner(stack), event_subject)
    for user in (bus_auth.GATEWAY, bus_auth.EVENT_STORE):
        async with bus_as(stack, user) as nc:
            js = nc.jetstream()
            with pytest.raises(TimeoutError):
                await js.publish(
                    work_subject,
                    encode_event(forged),
                    stream=subjects.RUNNER_WORK_STREAM,
                    headers={EVENT_SEQUENCE_HEADER: "1"},
                    timeout=DENIED_SECONDS,
                )
            runners = await js.key_value(subjects.RUNNERS_BUCKET)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(runners.put("ghost", b"{}"), 2)
    async with bus_as(stack, bus_auth.ADMIN) as admin:
        js = admin.jetstream()
        with pytest.raises(NotFoundError):
            await js.get_last_msg(subjects.RUNNER_WORK_STREAM, work_subject)
        with pytest.raises(KeyNotFoundError):
            await (await js.key_value(subjects.RUNNERS_BUCKET)).get("ghost")


async def test_no_other_service_can_take_the_event_stores_leases_or_durables(
    stack: Stack,
) -> None:
    """A forged event-store lease would make its holder give the partition up; a taken (or
    pulled from) partition durable would leave events out of ClickHouse for good."""
    lease_key = f"{subjects.EVENT_STORE_DURABLE}.p0"
    durable = subjects.event_store_durable(0)

    async def attempt(user: str) -> None:
        async with bus_as(stack, user) as nc:
            js = nc.jetstream()
            kv = await js.key_value(subjects.PARTITIONS_BUCKET)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(kv.put(lease_key, b"forged"), 2)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(kv.delete(lease_key), 2)
            with pytest.raises(TimeoutError):
                await js.add_consumer(
                    subjects.EVENTS_STREAM,
                    ConsumerConfig(
                        durable_name=durable,
                        filter_subject=subjects.partition_events(1),
                        name=None,
                    ),
                )
            with pytest.raises(nats.errors.TimeoutError):  # no answer: the pull is denied
                await nc.request(
                    f"$JS.API.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}.{durable}",
                    json.dumps({"batch": 1, "no_wait": True}).encode(),
                    timeout=DENIED_SECONDS,
                )

    await asyncio.gather(
        *map(attempt, (bus_auth.GATEWAY, bus_auth.SESSION_MANAGER, bus_auth.RUNTIME_RUNNER))
    )
    async with bus_as(stack, bus_auth.ADMIN) as admin:
        js = admin.jetstream()
        lease = await (await js.key_value(subjects.PARTITIONS_BUCKET)).get(lease_key)
        assert lease.value and lease.value != b"forged"  # still the event-store's
        consumer = await js.consumer_info(subjects.EVENTS_STREAM, durable)
        assert consumer.config.filter_subject == subjects.partition_events(0)


async def dead_letters(stack: Stack, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(dead-letter subject, refused subject) -> reason, once every `wanted` one has arrived."""
    found: dict[tuple[str, str], str] = {}
    async with bus_as(stack, bus_auth.ADMIN) as nc:
        sub = await nc.jetstream().subscribe(
            subjects.ALL_DEADLETTERS,
            stream=subjects.DEADLETTER_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        try:
            async with asyncio.timeout(DEAD_LETTER_SECONDS):
                while not wanted <= found.keys():
                    msg = await sub.next_msg(timeout=DEAD_LETTER_SECONDS)
                    headers = msg.headers or {}
                    found[(msg.subject, headers[SUBJECT_HEADER])] = headers[REASON_HEADER]
        finally:
            await sub.unsubscribe()
    return found


def sentinel(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "keep-me").write_text("the runner must not delete this")
    return directory / "keep-me"


async def test_forged_events_with_path_like_or_foreign_ids_change_nothing(stack: Stack) -> None:
    """Sent with the runtime-runner's own credential, which may append events."""
    victim = await conversation(stack)
    workspaces = stack.data_dir / "workspaces"
    # Where `<workspaces>/<id>` and `<workspaces>/.home/<id>` point for the id "../../x".
    outside = [
        sentinel((workspaces / "../../x").resolve()),
        sentinel((workspaces / ".home/../../x").resolve()),
    ]
    bystander = f"bystander_{uuid.uuid4().hex[:8]}"
    inside = sentinel(workspaces / bystander)
    messages = [
        # The attack: a path as the id, on a real conversation's subject.
        (subjects.event_subject(victim, "ConversationDeleted"), "../../x"),
        # A valid id that is not the subject's: would delete the bystander's workspace.
        (subjects.event_subject(victim, "ConversationDeleted"), bystander),
        # A subject token that is no conversation id, matching the payload.
        (subjects.event_subject("%2e%2e%2fx", "ConversationDeleted"), "%2e%2e%2fx"),
    ]
    async with bus_as(stack, bus_auth.RUNTIME_RUNNER) as nc:
        js = nc.jetstream()
        for subject, payload_id in messages:
            event = ConversationDeleted(
                conversation_id=payload_id, source=EventSource.USER, id=1_000
            )
            await js.publish(subject, encode_event(event))  # stored: the credential may append
    wanted = {
        (subjects.dead_letter_subject(service), subject)
        # The runner reads no log: session-manager, refusing them, forwards it nothing.
        for service in (subjects.SESSION_MANAGER, subjects.EVENT_STORE)
        for subject in {subject for subject, _ in messages}
    }
    reasons = await dead_letters(stack, wanted)
    assert any("invalid conversation id" in reason for reason in reasons.values())
    assert any("differs from the subject" in reason for reason in reasons.values())
    # Every consumer has refused them by now: nothing was deleted, on the host or in the log.
    for path in [*outside, inside]:
        assert path.read_text() == "the runner must not delete this", path
    async with stack.client() as api:
        shown = await api.get(f"/api/conversations/{victim}")
        assert shown.status_code == 200
        assert shown.json()["status"] != "DELETED"


async def test_a_command_with_a_path_like_id_is_refused(stack: Stack) -> None:
    """Sent with the gateway's credential, the one allowed to send commands."""
    command = DeleteConversation(user_id="local", conversation_id="../../x")
    subject = command_subject(command)
    async with bus_as(stack, bus_auth.GATEWAY) as nc:
        await nc.jetstream().publish(
            subject, encode_command(command), stream=subjects.COMMANDS_STREAM
        )
    dead_letter = subjects.dead_letter_subject(subjects.SESSION_MANAGER)
    reasons = await dead_letters(stack, {(dead_letter, subject)})
    assert "invalid conversation id" in reasons[(dead_letter, subject)]


async def test_a_services_own_work_raises_no_permissions_violation(stack: Stack) -> None:
    """Least privilege must still cover everything a service does for a task: a violation
    in a service's log means a denied step it then works around or, worse, drops."""
    async with stack.client() as api:
        created = await api.post("/api/conversations", json={"initial_user_msg": "hi"})
        assert created.status_code == 201, created.text
        cid = created.json()["conversation_id"]
        assert (await api.get(f"/api/conversations/{cid}/events")).status_code == 200
    logs = stack.data_dir / "logs"
    for log in sorted(logs.glob("*.log")):
        assert "permissions violation" not in log.read_text(errors="replace").lower(), log.name


@contextlib.contextmanager
def session_manager_stopped(stack: Stack) -> Iterator[Callable[[], None]]:
    """Session-manager stopped (SIGSTOP) until the block calls `go_on()` or ends: a request
    sent meanwhile waits for it, so whatever else answers is seen first."""
    pid = int((stack.data_dir / "pids" / "session-manager.pid").read_text())
    os.kill(pid, signal.SIGSTOP)

    def go_on() -> None:
        os.kill(pid, signal.SIGCONT)

    try:
        yield go_on
    finally:
        go_on()


async def test_a_forged_refusal_notified_to_a_waiting_create_changes_nothing(
    stack: Stack,
) -> None:
    """A core subscriber sees every publish on a stream's subject, even one JetStream refuses to
    store. The gateway's create waits on such notifications: woken by a ConversationRejected
    that was never stored (sent with the runner's credential, refused for an impossible
    expected sequence) it must read the log, find no refusal, and wait on for the real answer
    rather than turn the create into a 429. Session-manager is stopped meanwhile, so the
    forgery is the only answer there is when it comes."""
    key = uuid.uuid4().hex
    cid = conversation_id_for(LOCAL_USER, key)
    command = subjects.conversation_command_subject(cid, CreateConversation.name())
    forged = ConversationRejected(
        conversation_id=cid,
        source=EventSource.ENVIRONMENT,
        user_id=LOCAL_USER,
        reason="queue_full",
        detail="forged",
    )
    with session_manager_stopped(stack) as go_on:
        async with stack.client(timeout=60) as api:
            create = asyncio.create_task(
                api.post(
                    "/api/conversations",
                    json={"initial_user_msg": "hi"},
                    headers={"Idempotency-Key": key},
                )
            )
            async with bus_as(stack, bus_auth.ADMIN) as admin:
                # The gateway subscribes before it publishes: once its command is stored, it
                # is listening.
                while True:
                    with contextlib.suppress(NotFoundError):
                        await admin.jetstream().get_last_msg(subjects.COMMANDS_STREAM, command)
                        break
                    await asyncio.sleep(0.05)
            async with bus_as(stack, bus_auth.RUNTIME_RUNNER) as runner:
                with pytest.raises(APIError):  # refused: wrong last sequence
                    await runner.jetstream().publish(
                        subjects.event_subject(cid, forged.kind),
                        encode_event(forged),
                        headers={"Nats-Expected-Last-Subject-Sequence": "999999"},
                    )
            await asyncio.sleep(1.0)  # time to be fooled
            assert not create.done(), create.result().text
            go_on()
            created = await create
    assert created.status_code == 201, created.text
    assert created.json()["conversation_id"] == cid
    assert all(b'"forged"' not in event for event in await stored_events(stack, cid))


async def test_no_other_service_can_answer_a_waiting_command(stack: Stack) -> None:
    """The gateway takes a command's verdict from the notification of its put (no read
    follows): only session-manager, the verdicts bucket's one writer, may publish there. With
    it stopped, a refusal sent on the verdict's subject with each other service's credential
    is denied, and the command is answered by session-manager's verdict once it goes on."""
    cid = await conversation(stack)
    key = uuid.uuid4().hex
    command_id = command_msg_id(PauseConversation.name(), cid, LOCAL_USER, key)
    forged = CommandVerdict(
        command_id=command_id,
        conversation_id=cid,
        accepted=False,
        status=ConversationStatus.FINISHED,
        reason="forged",
        detail="forged",
    )
    with session_manager_stopped(stack) as go_on:
        async with stack.client(timeout=60) as api:
            pause = asyncio.create_task(
                api.post(f"/api/conversations/{cid}/pause", headers={"Idempotency-Key": key})
            )
            await asyncio.sleep(1.0)  # the gateway has published its command and waits
            for service in (bus_auth.RUNTIME_RUNNER, bus_auth.EVENT_STORE, bus_auth.GATEWAY):
                denied: list[Exception] = []

                async def on_error(error: Exception, denied: list[Exception] = denied) -> None:
                    denied.append(error)  # the server's -ERR for a denied publish

                nc = await connect(
                    stack.nats_url,
                    f"attacker-as-{service}",
                    stack.bus_credential(service),
                    allow_reconnect=False,
                    error_cb=on_error,
                )
                try:
                    await nc.publish(subjects.verdict_subject(command_id), encode_verdict(forged))
                    await nc.flush()
                    await asyncio.sleep(0.2)
                finally:
                    await nc.close()
                assert any("permissions violation" in str(e) for e in denied), (service, denied)
            assert not pause.done(), pause.result().text
            go_on()
            paused = await pause
    assert paused.status_code in (202, 409), paused.text
    assert "forged" not in paused.text
