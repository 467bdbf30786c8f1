"""Each service instance's readiness, for the gateway's `/api/health` (KV `taskbus_health`, key
`<service>.<instance id>`).

An instance puts its entry when it starts (not ready), again once it consumes (ready), and then
every `HEARTBEAT_SECONDS`; on a clean stop it puts `ready: false`. A killed one simply stops
beating: an entry older than `STALE_SECONDS` reads as not ready, and the bucket's TTL removes
it later. The same pattern as the runners' registry (contracts.runners), kept apart because it
covers every service and says nothing about placement.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import UTC, datetime, timedelta

import msgspec
import nats.errors
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.observability_metrics import Durables, MetricsListener, sample_consumer_lag
from taskbus.contracts.partitions import default_instance_id
from taskbus.contracts.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
STALE_SECONDS = 10.0
# How long a silent instance stays listed (as not ready) before the bucket forgets it.
HEALTH_TTL_SECONDS = 300.0


class InstanceHealth(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    instance_id: str
    host: str
    pid: int
    ready: bool
    started_at: datetime
    beat_at: datetime
    # Where this instance serves `/metrics` (0: it does not).
    metrics_port: int = 0


def is_ready(health: InstanceHealth, now: datetime) -> bool:
    """Ready, and heard from within `STALE_SECONDS`."""
    return health.ready and now - health.beat_at <= timedelta(seconds=STALE_SECONDS)


class ServiceReadiness(msgspec.Struct, frozen=True, kw_only=True):
    """A service is ready when at least one of its instances is."""

    ready: bool
    instances: list[InstanceHealth]


# The services that beat (the gateway answers /api/health itself, so it is ready if it answers).
BEATING_SERVICES = (subjects.SESSION_MANAGER, subjects.RUNTIME_RUNNER, subjects.EVENT_STORE)


def readiness(instances: list[InstanceHealth], now: datetime) -> dict[str, ServiceReadiness]:
    """Each beating service's readiness, its instances' `ready` as of `now` (stale: false);
    a service with no instance at all is listed, not ready."""
    by_service: dict[str, list[InstanceHealth]] = {service: [] for service in BEATING_SERVICES}
    for health in instances:
        current = msgspec.structs.replace(health, ready=is_ready(health, now))
        by_service.setdefault(health.service, []).append(current)
    return {
        service: ServiceReadiness(ready=any(health.ready for health in listed), instances=listed)
        for service, listed in by_service.items()
    }


def health_key(service: str, instance_id: str) -> str:
    return f"{service}.{instance_id}"


class Heartbeat:
    """This instance's entry in the health bucket; `ready()` once it consumes, `beat()` until
    cancelled, `stopped()` on a clean stop."""

    def __init__(
        self, js: JetStreamContext, service: str, instance: str = "", metrics_port: int = 0
    ) -> None:
        self._js = js
        now = datetime.now(UTC)
        self._health = InstanceHealth(
            service=service,
            instance_id=instance or default_instance_id(),
            host=socket.gethostname(),
            pid=os.getpid(),
            ready=False,
            started_at=now,
            beat_at=now,
            metrics_port=metrics_port,
        )

    async def ready(self) -> None:
        self._health = msgspec.structs.replace(self._health, ready=True)
        await self._put()

    async def stopped(self) -> None:
        self._health = msgspec.structs.replace(self._health, ready=False)
        try:
            await self._put()
        except (nats.errors.Error, TimeoutError) as error:  # it goes stale anyway
            logger.debug("health not updated at stop: %r", error)

    async def beat(self) -> None:
        while True:
            try:
                await self._put()
            except (nats.errors.Error, TimeoutError) as error:
                logger.warning("health heartbeat not sent: %r", error)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _put(self) -> None:
        self._health = msgspec.structs.replace(self._health, beat_at=datetime.now(UTC))
        bucket = await self._js.key_value(subjects.HEALTH_BUCKET)
        key = health_key(self._health.service, self._health.instance_id)
        await bucket.put(key, msgspec.json.encode(self._health))


class Vitals:
    """What every service process runs beside its work: `/metrics` (when a port is set), the
    consumer lag sampler and the readiness heartbeat. `ready()` once it consumes; `stop()`
    first thing on the way down, so /api/health stops calling it ready at once."""

    def __init__(
        self,
        js: JetStreamContext,
        service: str,
        *,
        instance: str,
        metrics_host: str,
        metrics_port: int | None,
        durables: Durables,
    ) -> None:
        self._listener = (
            None if metrics_port is None else MetricsListener(metrics_host, metrics_port)
        )
        self._heartbeat = Heartbeat(
            js, service, instance, 0 if self._listener is None else self._listener.port
        )
        self._js = js
        self._durables = durables
        self._tasks: list[asyncio.Task[None]] = []

    async def ready(self) -> None:
        await self._heartbeat.ready()
        self._tasks = [
            asyncio.create_task(self._heartbeat.beat(), name="health-heartbeat"),
            asyncio.create_task(sample_consumer_lag(self._js, self._durables), name="lag"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        await self._heartbeat.stopped()
        if self._listener is not None:
            self._listener.close()


def decode_health(data: bytes) -> InstanceHealth:
    return msgspec.json.decode(data, type=InstanceHealth)
