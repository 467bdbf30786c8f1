"""Sandbox latency, docker vs local, printed as a table.

    uv run python bench/runtime_latency.py [--starts 20] [--commands 300] [--image IMAGE]

- start-to-READY: `Sandbox.start()` as the runner calls it on RuntimeRequested (docker: create
  and start the container, exec the persistent bash, its first marker; local: spawn the bash),
  without a repository, one after another; then `--starts` sandboxes started at once (wall time).
- command round trip: `true` sent through the persistent shell and its marker back, one after
  another on a started sandbox; and the same for `C-c` interrupting a running `sleep`.
- docker only, start-to-READY from the warm pool (pool.py, `--pool` containers): the same start
  handed a warm container, one at a time with the pool refilled in between (a pool that keeps
  up with arrivals), beside the cold figure of the same run. Target: <= 150 ms create -> RUNNING,
  of which this is all but a few log appends and session-manager's decision.
NATS and the event log are not in these figures (an append is ~0.35 ms here, see ARCHITECTURE).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner.backend import sandbox_user
from taskbus.runtime_runner.docker_sandbox import (
    DockerEngine,
    DockerSandbox,
    DockerSandboxConfig,
    EngineUnavailable,
)
from taskbus.runtime_runner.limits import SandboxResources
from taskbus.runtime_runner.local import LocalConfinement, LocalSandbox
from taskbus.runtime_runner.pool import WarmPool
from taskbus.runtime_runner.sandbox import CommandRequest, Sandbox
from taskbus.runtime_runner.settings import RuntimeRunnerSettings
from taskbus.runtime_runner.shell import ShellLimits

LIMITS = ShellLimits(
    no_change_seconds=0.3,
    command_seconds=30,
    max_output_bytes=64 * 1024,
    max_streamed_bytes=1 << 20,
)
RESOURCES = SandboxResources(cpus=1, memory_mb=512, pids=256, network=NetworkMode.NONE)

SandboxMaker = Callable[[], Sandbox]


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def timed(action: Awaitable[object]) -> float:
    started = time.perf_counter()
    await action
    return time.perf_counter() - started


async def ignore(_: str) -> None:
    pass


async def measure(make: SandboxMaker, starts: int, commands: int) -> dict[str, tuple[float, float]]:
    figures: dict[str, tuple[float, float]] = {}
    sandboxes: list[Sandbox] = []
    try:
        start_times = []
        for _ in range(starts):
            sandbox = make()
            sandboxes.append(sandbox)
            start_times.append(await timed(sandbox.start(None, None)))
        figures["start-to-READY, one at a time"] = percentiles(start_times)
        together = [make() for _ in range(starts)]
        sandboxes.extend(together)
        wall = await timed(asyncio.gather(*(s.start(None, None) for s in together)))
        figures[f"{starts} started at once (wall)"] = (wall * 1000, wall * 1000)

        shell = sandboxes[0]
        round_trips = []
        for _ in range(commands):
            round_trips.append(
                await timed(shell.run_command(CommandRequest(command="true"), ignore))
            )
        figures["command round trip (`true`)"] = percentiles(round_trips)

        interrupts = []
        for _ in range(max(5, commands // 30)):
            await shell.run_command(CommandRequest(command="sleep 100"), ignore)  # soft timeout
            request = CommandRequest(command="C-c", is_input=True)
            interrupts.append(await timed(shell.run_command(request, ignore)))
        figures["C-c of a running command"] = percentiles(interrupts)
    finally:
        await asyncio.gather(*(s.close() for s in sandboxes))
    return figures


async def warm_starts(
    config: DockerSandboxConfig, root: Path, size: int, starts: int
) -> dict[str, tuple[float, float]]:
    """start-to-READY of sandboxes handed a warm container, the pool full before each."""
    pool = WarmPool(config, root, size, RESOURCES, lambda: math.inf)
    config.warm = pool
    await pool.start()
    sandboxes: list[Sandbox] = []
    times = []
    try:
        for _ in range(starts):
            await pool.filled()
            sandbox = DockerSandbox(
                config, uuid.uuid4().hex, "bench", root, RESOURCES, LIMITS, clone_seconds=60
            )
            sandboxes.append(sandbox)
            times.append(await timed(sandbox.start(None, None)))
    finally:
        config.warm = None
        await asyncio.gather(*(s.close() for s in sandboxes))
        await pool.close()
    return {"start-to-READY, warm pool": percentiles(times)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--commands", type=int, default=300)
    parser.add_argument("--image", default="taskbus-sandbox:latest")
    parser.add_argument("--pool", type=int, default=4, help="warm pool size (docker)")
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="taskbus-bench-"))

    # As the runner runs them: under bubblewrap where it is installed, as the sandbox user.
    user = sandbox_user(RuntimeRunnerSettings())
    confinement = LocalConfinement(
        bubblewrap=shutil.which("bwrap") is not None,
        user=user,
        resources=RESOURCES,
        max_file_bytes=1 << 30,
    )

    def local() -> Sandbox:
        return LocalSandbox(uuid.uuid4().hex, root, LIMITS, confinement, clone_seconds=60)

    results = {"local": await measure(local, options.starts, options.commands)}
    try:
        engine = await DockerEngine.connect(options.image)
    except EngineUnavailable as reason:
        print(f"docker skipped: {reason}")
    else:
        config = DockerSandboxConfig(
            engine, options.image, "bench", {"taskbus.bench": "1"}, user=user
        )

        def docker() -> Sandbox:
            return DockerSandbox(
                config, uuid.uuid4().hex, "bench", root, RESOURCES, LIMITS, clone_seconds=60
            )

        results["docker"] = await measure(docker, options.starts, options.commands)
        results["docker"].update(await warm_starts(config, root, options.pool, options.starts))
        engine.close()

    print(f"\n{'measure':<34} {'backend':<8} {'p50 ms':>10} {'p99 ms':>10}")
    names = dict.fromkeys(name for figures in results.values() for name in figures)
    for name in names:
        for backend, figures in results.items():
            if name in figures:
                p50, p99 = figures[name]
                print(f"{name:<34} {backend:<8} {p50:>10.2f} {p99:>10.2f}")
    if "docker" in results:
        cold = results["docker"]["start-to-READY, one at a time"][0]
        warm = results["docker"]["start-to-READY, warm pool"][0]
        print(
            f"\ndocker start-to-READY p50: warm {warm:.1f} ms vs cold {cold:.1f} ms "
            f"(same run, {cold / warm:.1f}x faster); target <= 150 ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
