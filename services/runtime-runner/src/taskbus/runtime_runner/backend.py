"""Which sandbox backend this runner uses and how well it isolates, decided once at start-up.

`auto` takes the strongest that works here: docker (an engine answers and has the sandbox
image), then local under bubblewrap, then local unsandboxed only if the operator allows it.
The choice is logged and published as this runner's `RunnerInfo` (its registration and
heartbeat), which /api/health and the launcher's banner show and session-manager places by.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import nats.errors
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.runners import (
    HEARTBEAT_SECONDS,
    RunnerInfo,
    SandboxIsolation,
    encode_runner_info,
)
from taskbus.runtime_runner import bubblewrap
from taskbus.runtime_runner.docker_sandbox import DockerEngine, EngineUnavailable
from taskbus.runtime_runner.settings import RuntimeRunnerSettings

logger = logging.getLogger(__name__)

UNSANDBOXED_OPT_IN = "TASKBUS_ALLOW_UNSANDBOXED=1"


class SandboxUnavailable(Exception):
    """The runner cannot run sandboxes as configured; it refuses to start."""


class Backend:
    def __init__(
        self,
        isolation: SandboxIsolation,
        engine: DockerEngine | None = None,
        warning: str | None = None,
    ) -> None:
        self.isolation = isolation
        self.engine = engine
        self.warning = warning

    @property
    def name(self) -> str:
        return "docker" if self.engine is not None else "local"


def sandbox_user(settings: RuntimeRunnerSettings) -> tuple[int, int] | None:
    """The (uid, gid) a root runner's sandboxes drop to; None: they run as the runner."""
    if os.geteuid() != 0:
        return None
    return settings.sandbox_uid, settings.sandbox_gid


async def _docker(settings: RuntimeRunnerSettings) -> Backend:
    engine = await DockerEngine.connect(settings.sandbox_image)
    runtimes = (await asyncio.to_thread(engine.api.info)).get("Runtimes") or {}
    if settings.docker_runtime not in runtimes:
        engine.close()
        raise SandboxUnavailable(
            f"the Docker engine has no runtime {settings.docker_runtime!r} "
            f"(it has {', '.join(sorted(runtimes))}): register it in /etc/docker/daemon.json"
        )
    isolation = (
        SandboxIsolation.GVISOR
        if settings.docker_runtime == "runsc"
        else SandboxIsolation.DOCKER_HARDENED
    )
    return Backend(isolation, engine)


async def _local(settings: RuntimeRunnerSettings, why_not_docker: str | None) -> Backend:
    problem = await asyncio.to_thread(bubblewrap.probe, sandbox_user(settings))
    if problem is None:
        return Backend(SandboxIsolation.BUBBLEWRAP)
    if not settings.allow_unsandboxed:
        docker = f"{why_not_docker}; " if why_not_docker else ""
        raise SandboxUnavailable(
            f"refusing to run local sandboxes unsandboxed ({docker}{problem}): "
            f"`{bubblewrap.INSTALL_HINT}`, or set {UNSANDBOXED_OPT_IN} to accept no isolation"
        )
    return Backend(
        SandboxIsolation.NONE,
        warning=(
            f"sandboxes run UNSANDBOXED as the runner's user ({problem}); "
            f"isolate them: {bubblewrap.INSTALL_HINT}"
        ),
    )


async def choose_backend(settings: RuntimeRunnerSettings) -> Backend:
    """The backend per `settings.backend`; raises `SandboxUnavailable` when none is allowed."""
    why_not_docker = None
    if settings.backend != "local":
        try:
            backend = await _docker(settings)
        except EngineUnavailable as unavailable:
            if settings.backend == "docker":
                raise SandboxUnavailable(str(unavailable)) from None
            why_not_docker = str(unavailable)
        else:
            logger.info(
                "sandbox backend: docker (%s, image %s, runtime %s), isolation %s",
                settings.backend,
                settings.sandbox_image,
                settings.docker_runtime,
                backend.isolation,
            )
            return backend
    backend = await _local(settings, why_not_docker)
    reason = f"; {why_not_docker}" if why_not_docker else ""
    if backend.warning:
        logger.warning("sandbox backend: local, isolation none: %s", backend.warning)
    else:
        logger.info(
            "sandbox backend: local (%s%s), isolation %s",
            settings.backend,
            reason,
            backend.isolation,
        )
    return backend


def runner_info(settings: RuntimeRunnerSettings, backend: Backend) -> RunnerInfo:
    return RunnerInfo(
        runner_id=settings.runner_id,
        host=socket.gethostname(),
        backend=backend.name,
        isolation=backend.isolation,
        warning=backend.warning,
        started_at=datetime.now(UTC),
        slots=settings.runner_slots,
        memory_mb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024**2,
    )


class Registration:
    """This runner's entry in the runners bucket (key: its id), put again every
    `HEARTBEAT_SECONDS` with its live sandbox count: the heartbeat session-manager watches."""

    def __init__(
        self, js: JetStreamContext, info: RunnerInfo, sandboxes: Callable[[], int]
    ) -> None:
        self._js = js
        self._info = info
        self._sandboxes = sandboxes

    async def publish(self) -> None:
        bucket = await self._js.key_value(subjects.RUNNERS_BUCKET)
        info = msgspec.structs.replace(self._info, sandboxes=self._sandboxes())
        await bucket.put(info.runner_id, encode_runner_info(info))

    async def keep_alive(self) -> None:
        """Until cancelled; a failed put is retried on the next beat (a missed beat or two is
        within the loss bound)."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self.publish()
            except (nats.errors.Error, TimeoutError) as error:
                logger.warning("heartbeat not sent: %r", error)
