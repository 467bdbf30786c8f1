"""Taking sandboxes over after a runner restart, from the log: a conversation's runtime is live
here when its last `RuntimeStatusChanged` is ready or paused and its last `RuntimeRequested`
placed it on this runner. A runner that was declared lost (`RuntimeLost`) and came back finds
its conversations placed elsewhere, or failed, and gives their sandboxes back.

Docker, at start-up: containers of live runtimes are re-attached; every other container this
runner owns (its runtime stopped, failed, or never got ready) is removed, but for warm ones
never handed over, which the pool removes. Local sandboxes die
with the runner, leaving their workspace: a live runtime gets a new sandbox on it, lazily, on the
conversation's first event after the restart (start-up cannot tell live workspaces from the many
of stopped conversations without a log read each).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext

from taskbus.contracts.events import RuntimeRequested, RuntimeStatusChanged
from taskbus.contracts.status import RuntimeStatus
from taskbus.runtime_runner.docker_sandbox import (
    LABEL_MANAGED,
    LABEL_RUNNER,
    DockerEngine,
    DockerSandbox,
    conversation_of,
)
from taskbus.runtime_runner.local import LocalSandbox
from taskbus.runtime_runner.replies import is_given_back, last_event
from taskbus.runtime_runner.runner import RecoveredSandbox, RuntimeRunner, SandboxRecovery

logger = logging.getLogger(__name__)


async def live_runtime(
    js: JetStreamContext, conversation_id: str, runner_id: str
) -> tuple[RuntimeRequested, RuntimeStatus] | None:
    """The request behind the conversation's runtime live on this runner, and its status (ready
    or paused)."""
    status = await last_event(js, conversation_id, RuntimeStatusChanged)
    if not isinstance(status, RuntimeStatusChanged) or status.status not in (
        RuntimeStatus.READY,
        RuntimeStatus.PAUSED,
    ):
        return None
    requested = await last_event(js, conversation_id, RuntimeRequested)
    if not isinstance(requested, RuntimeRequested) or requested.runner_id not in (None, runner_id):
        return None
    if await is_given_back(js, conversation_id, requested.id, runner_id):
        return None
    return requested, status.status


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
        conversation_id = conversation_of(container)
        if conversation_id is None:
            return  # a warm container never handed over: the pool removes it (pool.py)
        live = await live_runtime(js, conversation_id, runner_id)
        if live is not None:
            sandbox = new_sandbox(live[0])
            paused = await sandbox.reattach()
            runner.adopt(conversation_id, sandbox, paused, live[0])
            logger.info("re-attached %s (conversation %s)", name, conversation_id)
        else:
            await engine.call(engine.api.remove_container, container["Id"], force=True)
            logger.info("removed %s: conversation %s has no live runtime", name, conversation_id)

    await asyncio.gather(*(settle(container) for container in containers))


def local_recovery(
    js: JetStreamContext,
    runner_id: str,
    new_sandbox: Callable[[RuntimeRequested], LocalSandbox],
) -> SandboxRecovery:
    """A new local sandbox on the workspace of a conversation's live runtime, if it has one
    and its workspace is still there; paused if the log says so."""

    async def recover(conversation_id: str) -> RecoveredSandbox | None:
        live = await live_runtime(js, conversation_id, runner_id)
        if live is None:
            return None
        requested, status = live
        sandbox = new_sandbox(requested)
        if not await sandbox.reattach():
            logger.warning(
                "conversation %s's runtime is live but its workspace is gone", conversation_id
            )
            return None
        logger.info("took over the workspace of conversation %s (%s)", conversation_id, status)
        return RecoveredSandbox(sandbox, status == RuntimeStatus.PAUSED, requested)

    return recover
