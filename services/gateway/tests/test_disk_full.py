"""A full disk under JetStream's store: writes fail with a 503 that says why, nothing stored is
damaged, and all resumes once space returns.

nats-server (2.14+) answers a write its disk refuses with no reply at all, and stops that stream
until it is restarted (nats-io/nats-server#7788): so the gateway only sees the write go
unconfirmed, and "space returns" means space freed, then nats-server restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import EventSource, MessageAction
from taskbus.devtools.nats_server import NatsServer
from taskbus.devtools.small_disk import SmallDiskUnavailable, fill, small_disk
from taskbus.gateway.app import create_app
from taskbus.gateway.settings import GatewaySettings

from .conftest import SessionManagerDouble

# Enough for the streams' first blocks, and a filler takes the rest.
DISK = "8m"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK, mounted for this test alone."""
    (tmp_path / "disk").mkdir()
    try:
        with small_disk(tmp_path / "disk", DISK) as mounted:
            yield mounted
    except SmallDiskUnavailable as unavailable:
        pytest.skip(f"{unavailable} (root needed)")


@pytest.fixture
def nats_on_small_disk(disk: Path, tmp_path: Path) -> Iterator[NatsServer]:
    """JetStream told it has far more room than the disk (as when other files share the disk):
    the disk, not JetStream's own accounting, is what runs out."""
    config = tmp_path / "nats.conf"
    config.write_text("jetstream { max_file_store: 100GB }\n")
    with NatsServer(disk / "nats", log_file=tmp_path / "nats.log", config_file=config) as s:
        yield s


@contextlib.asynccontextmanager
async def gateway_with_session_manager(
    settings: GatewaySettings, server: NatsServer
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway and session-manager's stand-in on `server`."""
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    app = create_app(msgspec.structs.replace(settings, nats_url=server.url))
    async with app.router.lifespan_context(app):
        js = nc.jetstream()
        double = SessionManagerDouble(js, await js.key_value(subjects.SETTINGS_BUCKET))
        await nc.subscribe(subjects.SESSION_MANAGER_COMMANDS, cb=double.on_command)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client
    await nc.close()


async def create(client: httpx.AsyncClient, alice: dict[str, str]) -> httpx.Response:
    return await client.post(
        "/api/conversations",
        json={"initial_user_msg": "hello"},
        headers={**alice, "Idempotency-Key": uuid.uuid4().hex},
    )


async def log_state(nc: Client) -> tuple[int, int]:
    state = (await nc.jetstream().stream_info(subjects.EVENTS_STREAM)).state
    return state.messages, state.last_seq


async def test_a_full_disk_answers_503_with_its_reason_damages_nothing_and_then_resumes(
    settings: GatewaySettings,
    nats_on_small_disk: NatsServer,
    disk: Path,
    alice: dict[str, str],
) -> None:
    server = nats_on_small_disk
    async with gateway_with_session_manager(settings, server) as client:
        before = await create(client, alice)
        assert before.status_code == 201, before.text
        accepted = [before.json()["conversation_id"]]  # every conversation confirmed
        nc = await nats.connect(server.url)
        filler = fill(disk)
        # Small writes may still fit the last page of a block, so the disk refuses one soon
        # rather than at once; a command stored whose events were not is a 504 (not visible).
        for _ in range(20):
            answer = await create(client, alice)
            if answer.status_code == 201:
                accepted.append(answer.json()["conversation_id"])
            elif answer.status_code != 504:
                break
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"]
        problem = answer.json()
        assert problem["reason"] == "log_write_unconfirmed"
        assert "storage is full or failing" in problem["detail"]
        stored = await log_state(nc)
        # Another writer's append fails too (larger than any partly used page), and nothing
        # of it is stored.
        appender = EventAppender(nc.jetstream())
        with pytest.raises(nats.errors.TimeoutError):
            async with asyncio.timeout(60):
                await appender.append(
                    MessageAction(
                        conversation_id=uuid.uuid4().hex,
                        source=EventSource.AGENT,
                        content="x" * 20_000,
                    )
                )
        assert await log_state(nc) == stored
        await nc.close()

        filler.unlink()
        # On this thread: nats-server dies with the thread that started it (PDEATHSIG).
        server.stop()
        server.start()
        # The gateway and the stand-in reconnect by themselves; then creates go through.
        deadline = time.monotonic() + 60
        while (after := await create(client, alice)).status_code != 201:
            assert after.status_code in (503, 504), after.text
            assert time.monotonic() < deadline, "creates never resumed"
            await asyncio.sleep(0.5)
        accepted.append(after.json()["conversation_id"])
        # Everything confirmed before and while the disk was full is intact after the restart.
        nc = await nats.connect(server.url)
        messages, last_seq = await log_state(nc)
        assert messages > stored[0] and last_seq > stored[1]
        await nc.close()
        for cid in accepted:
            page = await client.get(f"/api/conversations/{cid}", headers=alice)
            assert page.status_code == 200, page.text
            assert (page.json()["status"], page.json()["last_event_id"]) == ("STARTING", 1)
