"""`taskbus up`: the whole stack on one machine with embedded defaults.

Starts nats-server (JetStream, data under the data dir) with one user per service (fresh
passwords in `<data dir>/bus/<user>.json`, 0600; permissions in `bus_auth`), creates the streams
with the admin user and the operator's limits, then the scripted model when no LLM is
configured, and the four services as supervised child processes (restarted when they crash),
each handed only its own credential file.
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
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError, ServiceUnavailableError

from taskbus.contracts import subjects
from taskbus.contracts.bus import CREDENTIALS_FILE_ENV, BusCredential, connect
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.partitions import PARTITIONS
from taskbus.contracts.runners import RunnerInfo, SandboxIsolation, decode_runner_info
from taskbus.contracts.secret_box import ensure_key_file
from taskbus.contracts.streams import ensure_streams, stream_limits_from_env
from taskbus.devtools import bus_auth
from taskbus.devtools.nats_server import NatsServer, die_with_parent, free_port
from taskbus.devtools.sandbox_policy import (
    ALLOW_UNSANDBOXED_ENV,
    INSTALL_BWRAP,
    runner_may_run_unsandboxed,
)

log = logging.getLogger("taskbus.launcher")

SERVICES = ("event_store", "session_manager", "runtime_runner", "gateway")
# The durable consumers the services pull from: the stack is ready when each has a pull waiting
# (and the runner has registered, which it does once it consumes: `wait_for_runner`).
DURABLES = (
    *subjects.session_manager_durables(),
    *((subjects.EVENTS_STREAM, subjects.event_store_durable(p)) for p in range(PARTITIONS)),
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
    # What the runtime-runner reported about itself: its backend and sandbox isolation.
    runner: RunnerInfo


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


# Secrets in the launcher's environment and the only services that use them: the others never
# hold them, so a compromised runner or event-store process has neither key to give away.
_SECRET_USERS = {
    "TASKBUS_LLM_API_KEY": {"session_manager"},
    # The runner opens users' git tokens, sandbox secrets and MCP secrets at sandbox start.
    "TASKBUS_SECRETS_KEY": {"session_manager", "gateway", "runtime_runner"},
    "TASKBUS_SECRETS_KEY_FILE": {"session_manager", "gateway", "runtime_runner"},
}


def without_secrets_it_does_not_need(env: dict[str, str], service: str) -> dict[str, str]:
    return {
        name: value
        for name, value in env.items()
        if name not in _SECRET_USERS or service in _SECRET_USERS[name]
    }


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


async def wait_for_gateway(url: str) -> None:
    async with httpx.AsyncClient() as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/api/health", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.2)


async def wait_for_consumers(js: JetStreamContext) -> None:
    """Services are ready once each durable consumer has a pull request waiting. A busy or
    still electing JetStream answers late or 503: asked again (the caller bounds the wait)."""
    pending = set(DURABLES)
    while pending:
        for stream, durable in list(pending):
            with contextlib.suppress(NotFoundError, ServiceUnavailableError, TimeoutError):
                if (await js.consumer_info(stream, durable)).num_waiting:
                    pending.discard((stream, durable))
        await asyncio.sleep(0.2)


async def wait_for_runner(js: JetStreamContext, runner_id: str, since: float) -> RunnerInfo:
    """The runner's report of the isolation it uses, written after `since` (epoch seconds)."""
    kv = await js.key_value(subjects.RUNNERS_BUCKET)
    while True:
        with contextlib.suppress(KeyNotFoundError, TimeoutError):
            entry = await kv.get(runner_id)
            if entry.value:
                info = decode_runner_info(entry.value)
                if info.started_at.timestamp() >= since:
                    return info
        await asyncio.sleep(0.2)


def scripted_model_env(base_url: str) -> dict[str, str]:
    """The services' LLM settings for the scripted model serving `base_url`."""
    return {
        "TASKBUS_LLM_MODEL": "openai/scripted",
        "TASKBUS_LLM_BASE_URL": base_url,
        "TASKBUS_LLM_API_KEY": "scripted-model-needs-no-key",
        "TASKBUS_LLM_INPUT_COST_PER_TOKEN": SCRIPTED_INPUT_COST_PER_TOKEN,
        "TASKBUS_LLM_OUTPUT_COST_PER_TOKEN": SCRIPTED_OUTPUT_COST_PER_TOKEN,
    }


def write_nats_config(path: Path, credentials: dict[str, BusCredential]) -> None:
    """nats-server's users and permissions, passwords included: the operator's file (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(bus_auth.render_authorization({u: c.password for u, c in credentials.items()}))


async def wait_for_port(port: int) -> None:
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
    started = time.time()
    data_dir = await asyncio.to_thread(Path(settings.data_dir).resolve)
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pids = data_dir / "pids"
    api_key = ensure_api_key(data_dir / "api_keys")
    # Before anything starts: may raise UnsandboxedRefused.
    unsandboxed = await runner_may_run_unsandboxed(os.environ, data_dir / "api_keys")
    bus = data_dir / "bus"
    credentials = bus_auth.new_credentials(bus)
    write_nats_config(bus / "nats.conf", credentials)
    nats_server = NatsServer(
        data_dir / "nats", port=settings.nats_port, config_file=bus / "nats.conf"
    ).start()
    _write_nats_pid_file(nats_server, pids / "nats-server.pid")
    nats_keeper = asyncio.create_task(
        _restart_nats_when_it_exits(nats_server, pids / "nats-server.pid"), name="nats-keeper"
    )
    children: list[Child] = []
    try:
        nc = await connect(nats_server.url, "taskbus-launcher", credentials[bus_auth.ADMIN])
        await ensure_streams(nc.jetstream(), limits=stream_limits_from_env())

        env = dict(os.environ)
        env.pop(CREDENTIALS_FILE_ENV, None)  # each service gets its own, below
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            TASKBUS_NATS_URL=nats_server.url,
            TASKBUS_PORT=str(settings.port),
            TASKBUS_API_KEYS_FILE=str(data_dir / "api_keys"),
        )
        env.setdefault("TASKBUS_CLICKHOUSE_DSN", f"chdb://{data_dir / 'clickhouse'}")
        env.setdefault("TASKBUS_WORKSPACE_ROOT", str(data_dir / "workspaces"))
        # The key that seals users' LLM keys in NATS lives outside it (0600, in the data dir).
        if not env.get("TASKBUS_SECRETS_KEY") and not env.get("TASKBUS_SECRETS_KEY_FILE"):
            env["TASKBUS_SECRETS_KEY_FILE"] = str(ensure_key_file(data_dir / "secrets.key"))

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
                await wait_for_port(model_port)
            env.update(scripted_model_env(f"http://127.0.0.1:{model_port}/v1"))

        for service in SERVICES:
            name = service.replace("_", "-")
            service_env = {
                **without_secrets_it_does_not_need(env, service),
                CREDENTIALS_FILE_ENV: str(bus_auth.credential_file(bus, service)),
            }
            if service == "runtime_runner" and unsandboxed:
                service_env[ALLOW_UNSANDBOXED_ENV] = "1"
            child = Child(
                name,
                [sys.executable, "-m", f"taskbus.{service}"],
                service_env,
                logs / f"{name}.log",
                pids / f"{name}.pid",
            )
            children.append(child)
            child.start()

        gateway_url = f"http://127.0.0.1:{settings.port}"
        async with asyncio.timeout(STARTUP_SECONDS):
            await wait_for_gateway(gateway_url)
            await wait_for_consumers(nc.jetstream())
            runner = await wait_for_runner(
                nc.jetstream(), env.get("TASKBUS_RUNNER_ID", "default"), started
            )
        await nc.drain()
        info = StackInfo(
            gateway_url=gateway_url,
            nats_url=nats_server.url,
            api_key=api_key,
            scripted_model=scripted,
            runner=runner,
        )
        if after_start is not None:
            await after_start(info)
        else:
            _print_banner(info, logs, bus)
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


def _print_banner(info: StackInfo, logs: Path, bus_dir: Path) -> None:
    model = "scripted model (offline, plays a fixed script)" if info.scripted_model else "LLM"
    print(
        f"Taskbus is up.\n"
        f"  gateway   {info.gateway_url}   (OpenAPI: {info.gateway_url}/docs)\n"
        f"  API key   {info.api_key}\n"
        f"  NATS      {info.nats_url}   (one credential per service: {bus_dir})\n"
        f"  model     {model}\n"
        f"  sandboxes {_isolation(info.runner)}\n"
        f"  logs      {logs}\n"
        f"Try: curl -H 'Authorization: Bearer {info.api_key}' \\\n"
        f"       {info.gateway_url}/api/conversations\n"
        f"Ctrl-C stops everything.",
        flush=True,
    )


def _isolation(runner: RunnerInfo) -> str:
    """The isolation line of the banner; unsandboxed is impossible to miss."""
    named = f"{runner.isolation.value} ({runner.backend} backend, runner {runner.runner_id})"
    if runner.isolation is not SandboxIsolation.NONE:
        return named
    bar = "!" * 78
    return (
        f"{named}\n{bar}\n"
        "  WARNING: SANDBOXES ARE NOT ISOLATED. Code written by the LLM runs as this user,\n"
        "  with this user's files, processes and network. Only for a single-user laptop.\n"
        f"  {runner.warning or ''}\n"
        f"  Isolate them with bubblewrap:  {INSTALL_BWRAP}\n{bar}"
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
