"""Shared helpers for session-manager tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig

from taskbus.contracts.events import Event
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer
from taskbus.session_manager.admission_ledger import AdmissionLedger
from taskbus.session_manager.state import ConversationState, fold

CID = "c1"

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
