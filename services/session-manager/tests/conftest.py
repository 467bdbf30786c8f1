"""Shared helpers for session-manager tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

import msgspec
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig

from taskbus.contracts import subjects
from taskbus.contracts.events import Event
from taskbus.contracts.runners import RunnerInfo, SandboxIsolation, encode_runner_info
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer
from taskbus.session_manager.admission_ledger import AdmissionLedger
from taskbus.session_manager.state import ConversationState, fold

CID = "c1"
# The runner the tests that play runtime-runner themselves stand for. Its entry is put once and
# never beats: their settings keep it alive with a long `runner_lost_seconds` (RUNNER_ALIVE).
FAKE_RUNNER = "fake-runner"
RUNNER_ALIVE = {"runner_lost_seconds": 3600.0}


async def register_fake_runner(js: JetStreamContext) -> None:
    """Session-manager places every sandbox on a registered runner: this is the one."""
    await ensure_streams(js)
    bucket = await js.key_value(subjects.RUNNERS_BUCKET)
    await bucket.put(FAKE_RUNNER, encode_runner_info(runner_info(FAKE_RUNNER)))


def runner_info(runner_id: str, slots: int = 16, sandboxes: int = 0) -> RunnerInfo:
    """A runner's registration, as tests that play the runner give it."""
    return RunnerInfo(
        runner_id=runner_id,
        host="test",
        backend="test",
        isolation=SandboxIsolation.NONE,
        started_at=datetime.now(UTC),
        slots=slots,
        sandboxes=sandboxes,
    )


async def _register_at(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await register_fake_runner(nc.jetstream())
    finally:
        await nc.drain()


FoldEvents = Callable[..., ConversationState]


@pytest.fixture
def fold_events() -> FoldEvents:
    """Fold events given in log order, numbering them 0, 1, 2… as the appender would."""

    def state_of(*events: Event) -> ConversationState:
        return fold(CID, [msgspec.structs.replace(e, id=i) for i, e in enumerate(events)])

    return state_of


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server of the module's own, so other tests' conversations are not recovered."""
    with NatsServer(tmp_path_factory.mktemp("sm-nats")) as server:
        asyncio.run(_register_at(server.url))
        yield server.url


@pytest.fixture
async def bus(own_nats: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(own_nats)
    js = nc.jetstream()
    await ensure_streams(js)
    yield js
    await nc.drain()


@pytest.fixture
async def ledger(bus: JetStreamContext) -> AdmissionLedger:
    """An admission ledger of the test's own, in a real KV bucket."""
    name = f"admission_{uuid.uuid4().hex[:12]}"
    await bus.create_key_value(KeyValueConfig(bucket=name, history=1))
    return AdmissionLedger(bus, bucket=name)
