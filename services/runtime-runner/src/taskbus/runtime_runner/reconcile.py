"""Start-up reconciliation of the docker backend, from the log: containers of conversations
whose runtime is still live (last `RuntimeStatusChanged` ready or paused) are re-attached; every
other container this runner owns (its runtime stopped, failed, or never got ready) is removed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext

from taskbus.contracts.events import RuntimeRequested, RuntimeStatusChanged
from taskbus.contracts.status import RuntimeStatus
from taskbus.runtime_runner.docker_sandbox import (
    LABEL_CONVERSATION,
    LABEL_MANAGED,
    LABEL_RUNNER,
    DockerEngine,
    DockerSandbox,
)
from taskbus.runtime_runner.replies import last_event
from taskbus.runtime_runner.runner import RuntimeRunner

logger = logging.getLogger(__name__)


def is_live(last_status: RuntimeStatusChanged | None) -> bool:
    return last_status is not None and last_status.status in (
        RuntimeStatus.READY,
        RuntimeStatus.PAUSED,
    )


async def reconcile(
    engine: DockerEngine,
    runner_id: str,
    js: JetStreamContext,
    new_sandbox: Callable[[RuntimeRequested], DockerSandbox],
    runner: RuntimeRunner,
) -> None:
    containers = await engine.call(
        engine.api.containers,
        all=True,
        filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_RUNNER}={runner_id}"]},
    )

    async def settle(container: dict[str, Any]) -> None:
        name = container["Names"][0].lstrip("/")
        conversation_id = container["Labels"].get(LABEL_CONVERSATION, "")
        status = await last_event(js, conversation_id, RuntimeStatusChanged)
        requested = await last_event(js, conversation_id, RuntimeRequested)
        if (
            isinstance(status, RuntimeStatusChanged)
            and is_live(status)
            and isinstance(requested, RuntimeRequested)
        ):
            sandbox = new_sandbox(requested)
            paused = await sandbox.reattach()
            runner.adopt(conversation_id, sandbox, paused)
            logger.info("re-attached %s (conversation %s)", name, conversation_id)
        else:
            await engine.call(engine.api.remove_container, container["Id"], force=True)
            logger.info("removed %s: conversation %s has no live runtime", name, conversation_id)

    await asyncio.gather(*(settle(container) for container in containers))
