"""The warm pool: docker containers started before any conversation asks for one, so a new
conversation's sandbox is ready after two renames rather than a container start and an exec
(~250 + ~90 ms here, more under load, as the engine starts containers one after another).

A warm container is made as a conversation's is (image, user, hardening), with the operator's
default resources (a conversation asking for other limits starts cold), bound to an empty
directory of its own, `<workspace root>/.warm/<runner id>/<token>`. Nothing runs in it but
`sleep` and an idle shell, started without secrets, until it is handed over
(`DockerSandbox._take_warm`; a conversation with sandbox secrets starts its own shell); from
then on it is that conversation's and never comes back (a given-back sandbox is removed), so no
container, shell or directory ever serves two conversations. A take wakes the filler, which
replaces the container in the background while the runner has room (`room`: sandboxes it may
still start).

Warm containers still in the pool are removed when the runner stops; those a killed runner left
are removed when the next one starts (reconcile skips them: they serve no conversation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path

import docker.errors

from taskbus.contracts.tasks import cancel_and_wait
from taskbus.runtime_runner.docker_sandbox import (
    LABEL_RUNNER,
    LABEL_WARM,
    WARM_NAME_PREFIX,
    DockerSandboxConfig,
    WarmContainer,
)
from taskbus.runtime_runner.limits import SandboxResources

logger = logging.getLogger(__name__)

# How often a filler that had no room (or failed) looks again without being woken.
_RECHECK_SECONDS = 1.0
_FAILURE_BACKOFF_SECONDS = 5.0
_STOP_SECONDS = 30.0


class WarmPool:
    def __init__(
        self,
        config: DockerSandboxConfig,
        workspace_root: Path,
        size: int,
        resources: SandboxResources,
        room: Callable[[], float],
    ) -> None:
        self._config = config
        self._directory = workspace_root.resolve() / ".warm" / config.runner_id
        self._size = size
        self._resources = resources
        self._room = room
        self._ready: deque[WarmContainer] = deque()
        self._making = 0
        self._wanted = asyncio.Event()
        self._full = asyncio.Event()
        self._closed = False
        self._filler: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """The containers it holds or is starting."""
        return len(self._ready) + self._making

    def take(self, resources: SandboxResources) -> WarmContainer | None:
        if resources != self._resources or not self._ready:
            return None
        self._wanted.set()
        self._full.clear()
        return self._ready.popleft()

    async def filled(self) -> None:
        """Until every container of the pool is started and ready to take."""
        await self._full.wait()

    async def start(self) -> None:
        await self._remove_leftovers()
        self._filler = asyncio.create_task(self._fill())

    async def close(self) -> None:
        """Stop filling (a container being started is finished, then removed) and remove the
        containers still in the pool. A filler stuck on the engine is cancelled after a while:
        a container it still makes is removed when the next runner starts."""
        self._closed = True
        self._wanted.set()
        if self._filler is not None:
            _, stuck = await asyncio.wait({self._filler}, timeout=_STOP_SECONDS)
            if stuck:
                logger.warning("the warm pool's filler did not stop in time")
                await cancel_and_wait(*stuck)
        await self._remove_leftovers()

    async def _fill(self) -> None:
        while not self._closed:
            missing = int(min(self._size - len(self), self._room() - len(self)))
            if missing > 0:
                made = await asyncio.gather(
                    *(self._make() for _ in range(missing)), return_exceptions=True
                )
                failures = [result for result in made if isinstance(result, BaseException)]
                if not failures:
                    continue
                logger.warning("%d warm containers not started: %r", len(failures), failures[0])
                wait = _FAILURE_BACKOFF_SECONDS
            else:
                wait = _RECHECK_SECONDS
            self._wanted.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wanted.wait()

    async def _make(self) -> None:
        token = secrets.token_hex(8)
        workspace = self._directory / token
        name = f"{WARM_NAME_PREFIX}{token}"
        self._making += 1
        try:
            await asyncio.to_thread(_new_directory, workspace)
            try:
                container = await self._config.start_container(
                    name, {LABEL_WARM: "true"}, workspace, self._resources
                )
                shell = await self._config.spawn_shell(container)
            except BaseException:
                await self._remove(name)
                await asyncio.to_thread(shutil.rmtree, workspace, True)
                raise
            self._ready.append(WarmContainer(name, workspace, shell))
            if len(self._ready) >= self._size:
                self._full.set()
        finally:
            self._making -= 1

    async def _remove(self, name: str) -> None:
        engine = self._config.engine
        with contextlib.suppress(docker.errors.NotFound):
            await engine.call(engine.api.remove_container, name, force=True)

    async def _remove_leftovers(self) -> None:
        """Remove this runner's warm containers not handed over, and their directories."""
        engine = self._config.engine
        containers = await engine.call(
            engine.api.containers,
            all=True,
            filters={"label": [f"{LABEL_WARM}=true", f"{LABEL_RUNNER}={self._config.runner_id}"]},
        )
        names = [str(c["Names"][0]).lstrip("/") for c in containers]
        await asyncio.gather(
            *(self._remove(name) for name in names if name.startswith(WARM_NAME_PREFIX))
        )
        for warm in self._ready:
            warm.shell.disconnect()
        self._ready.clear()
        self._full.clear()
        await asyncio.to_thread(shutil.rmtree, self._directory, True)


def _new_directory(workspace: Path) -> None:
    # 0700 up to the runner's directory: no sandbox user looks into another's empty workspace.
    workspace.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.mkdir(workspace, 0o700)
