"""Builds session-manager from its settings and runs it until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvloop

from taskbus.contracts import observability, subjects
from taskbus.contracts.broker import jetstream, service_broker
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.observability_health import Vitals
from taskbus.contracts.partitions import default_instance_id
from taskbus.contracts.streams import ensure_streams
from taskbus.session_manager import metrics
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
        js = jetstream(broker)
        await ensure_streams(js, settings.stream_replicas)
        manager = SessionManager(settings, broker, LLM(settings))
        metrics.ADMISSION_QUEUE.set_function(lambda: manager.queued)
        vitals = Vitals(
            js,
            subjects.SESSION_MANAGER,
            instance=settings.instance_id or default_instance_id(),
            metrics_host=settings.metrics_host,
            metrics_port=settings.metrics_port,
            durables=lambda: metrics.durables(manager.held_partitions),
        )
        await broker.start()  # the consumers' durables exist before `start` reads the log
        try:
            await manager.start()
            await vitals.ready()
            yield manager
        finally:
            await vitals.stop()
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
    observability.setup(subjects.SESSION_MANAGER)
    uvloop.run(run(settings_from_env(SessionManagerSettings)))
