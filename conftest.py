"""Fixtures shared by every test in the workspace: a real nats-server per test session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    """JetStream with Taskbus' streams and buckets in place."""
    context = nc.jetstream()
    await ensure_streams(context)
    return context


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent
