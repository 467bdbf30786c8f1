"""Builds session-manager from its settings and runs it until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from taskbus.contracts.broker import jetstream, service_broker
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.streams import ensure_streams
from taskbus.session_manager.llm import LLM
from taskbus.session_manager.service import SessionManager
from taskbus.session_manager.settings import SessionManagerSettings

logger = logging.getLogger("taskbus.session_manager")


@asynccontextmanager
async def running_session_manager(
    settings: SessionManagerSettings,
) -> AsyncIterator[SessionManager]:
    """A started session-manager; on exit its consumers and tasks stop, then the broker stops
    (draining its NATS connection)."""
    broker = service_broker(settings.nats_url, "session-manager")
    await broker.connect()
    try:
        await ensure_streams(jetstream(broker), settings.stream_replicas)
        manager = SessionManager(settings, broker, LLM(settings))
        await broker.start()  # the consumers' durables exist before `start` reads the log
        try:
            await manager.start()
            yield manager
        finally:
            await manager.stop()
    finally:
        await broker.stop()


async def run(settings: SessionManagerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_session_manager(settings):
        logger.info(
            "session-manager running (nats %s, model %s)", settings.nats_url, settings.llm_model
        )
        await stop.wait()
    logger.info("session-manager stopped")


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(settings_from_env(SessionManagerSettings)))
