"""`taskbus up`: the whole stack on one machine with embedded defaults.

Starts nats-server (JetStream, data under the data dir), the scripted model when no LLM is
configured, and the four services as supervised child processes (restarted when they crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import msgspec
import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer, die_with_parent, free_port

log = logging.getLogger("taskbus.launcher")

SERVICES = ("event_store", "session_manager", "runtime_runner", "gateway")
# The durable consumers the services pull from: the stack is ready when each has a pull waiting.
DURABLES = (
    (subjects.COMMANDS_STREAM, "session_manager_commands"),
    (subjects.EVENTS_STREAM, "session_manager_events"),
    (subjects.EVENTS_STREAM, "runtime_runner"),
    (subjects.EVENTS_STREAM, "event_store"),
)
LOCAL_USER = "local"
# Prices of the scripted model, so cost accounting runs through litellm for real.
SCRIPTED_INPUT_COST_PER_TOKEN = "0.000003"
SCRIPTED_OUTPUT_COST_PER_TOKEN = "0.000015"
STARTUP_SECONDS = 90
STOP_GRACE_SECONDS = 10
NATS_WATCH_SECONDS = 0.2


class LauncherSettings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: str = ".taskbus"
    nats_port: int = 4222
    port: int = 3000
    llm_model: str | None = None
    # The scripted model's script (JSON file); None plays the packaged demo.
    scripted_model_script: str | None = None


class StackInfo(msgspec.Struct, frozen=True, kw_only=True):
    gateway_url: str
    nats_url: str
    api_key: str
    scripted_model: bool


def local_api_key(keys_file: Path) -> str | None:
    """The local user's key from a `key=user` file, if it has one."""
    if keys_file.exists():
        for line in keys_file.read_text().splitlines():
            key, _, user = line.partition("=")
            if user.strip() == LOCAL_USER:
                return key.strip()
    return None


def ensure_api_key(keys_file: Path) -> str:
    """The local user's API key, created on first start and kept in the data dir."""
    existing = local_api_key(keys_file)
    if existing is not None:
        return existing
    key = "tb_" + secrets.token_urlsafe(24)
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    with keys_file.open("a") as handle:
        handle.write(f"{key}={LOCAL_USER}\n")
    keys_file.chmod(0o600)
    return key


def write_pid_file(pid_file: Path, pid: int) -> None:
    """`<data_dir>/pids/<name>.pid` names the process now running, for operators and fault tests."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{pid}\n")


class Child:
    """One supervised process: restarted with backoff whenever it exits while the stack runs.
    Each (re)start writes the new pid to `pid_file`."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_path: Path, pid_file: Path
    ) -> None:
        self.name = name
        self._args = args
        self._env = env
        self._log_path = log_path
        self._pid_file = pid_file
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            with self._log_path.open("ab") as log_file:
                self._process = await asyncio.create_subprocess_exec(
                    *self._args,
                    env=self._env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    # Out of the terminal's process group: Ctrl-C reaches only the launcher,
                    # which then stops the children in order.
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            write_pid_file(self._pid_file, self._process.pid)
            code = await self._process.wait()
            if self._stopping:
                return
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10.0)
            self.restarts += 1
            log.warning("%s exited with %s; restarting in %.1fs", self.name, code, backoff)
            await asyncio.sleep(backoff)

    def stop_restarting(self) -> None:
        self._stopping = True

    async def stop(self) -> None:
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _restart_nats_when_it_exits(server: NatsServer, pid_file: Path) -> None:
    """nats-server is supervised too: restarted on the same port and store directory, so the
    services' connections reconnect and JetStream recovers its streams from disk."""
    while True:
        await asyncio.sleep(NATS_WATCH_SECONDS)
        if not server.exited():
            continue
        log.warning("nats-server exited; restarting it")
        try:
            # Started from the loop's own thread, not a worker thread: the server's
            # PDEATHSIG fires when the thread that forked it exits.
            server.start()
        except (RuntimeError, TimeoutError, OSError):
            log.exception("nats-server did not restart")
            continue
        _write_nats_pid_file(server, pid_file)


def _write_nats_pid_file(server: NatsServer, pid_file: Path) -> None:
    if server.pid is not None:
        write_pid_file(pid_file, server.pid)


async def _wait_for_gateway(url: str) -> None:
    async with httpx.AsyncClient() as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/api/health", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.2)


async def _wait_for_consumers(js: JetStreamContext) -> None:
    """Services are ready once each durable consumer has a pull request waiting."""
    pending = set(DURABLES)
    while pending:
        for stream, durable in list(pending):
            with contextlib.suppress(NotFoundError):
                if (await js.consumer_info(stream, durable)).num_waiting:
                    pending.discard((stream, durable))
        await asyncio.sleep(0.2)


async def _wait_for_port(port: int) -> None:
    while True:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.1)


async def run_stack(
    settings: LauncherSettings,
    after_start: Callable[[StackInfo], Awaitable[None]] | None = None,
) -> None:
    """Run the stack until `after_start` returns (or, without one, until SIGINT/SIGTERM)."""
    data_dir = await asyncio.to_thread(Path(settings.data_dir).resolve)
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pids = data_dir / "pids"
    nats_server = NatsServer(data_dir / "nats", port=settings.nats_port).start()
    _write_nats_pid_file(nats_server, pids / "nats-server.pid")
    nats_keeper = asyncio.create_task(
        _restart_nats_when_it_exits(nats_server, pids / "nats-server.pid"), name="nats-keeper"
    )
    children: list[Child] = []
    try:
        nc = await nats.connect(nats_server.url)
        await ensure_streams(nc.jetstream())

        env = dict(os.environ)
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            TASKBUS_NATS_URL=nats_server.url,
            TASKBUS_PORT=str(settings.port),
            TASKBUS_API_KEYS_FILE=str(data_dir / "api_keys"),
        )
        env.setdefault("TASKBUS_CLICKHOUSE_DSN", f"chdb://{data_dir / 'clickhouse'}")
        env.setdefault("TASKBUS_WORKSPACE_ROOT", str(data_dir / "workspaces"))
        api_key = ensure_api_key(data_dir / "api_keys")

        scripted = settings.llm_model is None
        if scripted:
            model_port = free_port()
            model_args = ["-m", "taskbus.devtools.scripted_llm", "--port", str(model_port)]
            if settings.scripted_model_script is not None:
                model_args += ["--script", settings.scripted_model_script]
            model = Child(
                "scripted-llm",
                [sys.executable, *model_args],
                env,
                logs / "scripted-llm.log",
                pids / "scripted-llm.pid",
            )
            children.append(model)
            model.start()
            async with asyncio.timeout(STARTUP_SECONDS):
                await _wait_for_port(model_port)
            base_url = f"http://127.0.0.1:{model_port}/v1"
            env.update(
                TASKBUS_LLM_MODEL="openai/scripted",
                TASKBUS_LLM_BASE_URL=base_url,
                TASKBUS_LLM_API_KEY="scripted-model-needs-no-key",
                TASKBUS_LLM_INPUT_COST_PER_TOKEN=SCRIPTED_INPUT_COST_PER_TOKEN,
                TASKBUS_LLM_OUTPUT_COST_PER_TOKEN=SCRIPTED_OUTPUT_COST_PER_TOKEN,
            )

        for service in SERVICES:
            name = service.replace("_", "-")
            child = Child(
                name,
                [sys.executable, "-m", f"taskbus.{service}"],
                env,
                logs / f"{name}.log",
                pids / f"{name}.pid",
            )
            children.append(child)
            child.start()

        gateway_url = f"http://127.0.0.1:{settings.port}"
        async with asyncio.timeout(STARTUP_SECONDS):
            await _wait_for_gateway(gateway_url)
            await _wait_for_consumers(nc.jetstream())
        await nc.drain()
        info = StackInfo(
            gateway_url=gateway_url,
            nats_url=nats_server.url,
            api_key=api_key,
            scripted_model=scripted,
        )
        if after_start is not None:
            await after_start(info)
        else:
            _print_banner(info, logs)
            await _wait_for_signal()
    finally:
        nats_keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await nats_keeper
        for child in children:
            child.stop_restarting()
        for child in reversed(children):
            await child.stop()
        nats_server.stop()


def _print_banner(info: StackInfo, logs: Path) -> None:
    model = "scripted model (offline, plays a fixed script)" if info.scripted_model else "LLM"
    print(
        f"Taskbus is up.\n"
        f"  gateway   {info.gateway_url}   (OpenAPI: {info.gateway_url}/docs)\n"
        f"  API key   {info.api_key}\n"
        f"  NATS      {info.nats_url}\n"
        f"  model     {model}\n"
        f"  logs      {logs}\n"
        f"Try: curl -H 'Authorization: Bearer {info.api_key}' \\\n"
        f"       {info.gateway_url}/api/conversations\n"
        f"Ctrl-C stops everything.",
        flush=True,
    )


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("Stopping Taskbus...", flush=True)


def load_settings() -> LauncherSettings:
    return settings_from_env(LauncherSettings)
