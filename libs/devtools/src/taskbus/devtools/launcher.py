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
from typing import TypeVar

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
from taskbus.contracts.tasks import cancel_and_wait
from taskbus.devtools import bus_auth
from taskbus.devtools.client import ClientConfig, save_config
from taskbus.devtools.local_stack import (
    STATE_FILE,
    UpState,
    hold_lock,
    remove_sandboxes,
    sandbox_label,
    write_state,
)
from taskbus.devtools.nats_server import NatsServer, die_with_parent, free_port
from taskbus.devtools.sandbox_policy import (
    ALLOW_UNSANDBOXED_ENV,
    INSTALL_BWRAP,
    runner_may_run_unsandboxed,
)

log = logging.getLogger("taskbus.launcher")
T = TypeVar("T")

SERVICES = ("event_store", "session_manager", "runtime_runner", "gateway")
# The durable consumers the services pull from: each is ready when its durables have a pull
# waiting (and the runner once it has registered, which it does once it consumes).
SESSION_MANAGER_DURABLES = tuple(subjects.session_manager_durables())
EVENT_STORE_DURABLES = tuple(
    (subjects.EVENTS_STREAM, subjects.event_store_durable(p)) for p in range(PARTITIONS)
)
DURABLES = (*SESSION_MANAGER_DURABLES, *EVENT_STORE_DURABLES)
# The gateway echoes it in /api/health (its `instance_nonce` setting).
NONCE_ENV = "TASKBUS_INSTANCE_NONCE"
LOG_TAIL_LINES = 12
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


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group `pid` leads (each child starts its own session), so nothing it
    started outlives it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, indented, for an error that says why a child failed."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"    ({path} does not exist)"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])


class StartupFailed(Exception):
    """The stack could not start: the first line says why, the rest is the failing log's tail."""


class Child:
    """One supervised process: restarted with backoff whenever it exits while the stack runs.
    Each (re)start writes the new pid to `pid_file`; `exited` is set by the first exit, so a
    start-up can fail fast on a child that cannot run (a port in use, a bad setting)."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_path: Path, pid_file: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._args = args
        self._env = env
        self._pid_file = pid_file
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.exited = asyncio.Event()
        self.exit_code: int | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            started = time.monotonic()
            with self.log_path.open("ab") as log_file:
                self._process = await asyncio.create_subprocess_exec(
                    *self._args,
                    env=self._env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    # Its own process group, out of the terminal's: Ctrl-C reaches only the
                    # launcher, which then stops the children in order, each with its group.
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            write_pid_file(self._pid_file, self._process.pid)
            if self._stopping.is_set():  # stop() came while it was being spawned
                signal_group(self._process.pid, signal.SIGKILL)
            code = await self._process.wait()
            if self._stopping.is_set():
                return
            self.exit_code = code
            self.exited.set()
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10.0)
            self.restarts += 1
            log.warning("%s exited with %s; restarting in %.1fs", self.name, code, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)

    async def stop(self) -> None:
        """SIGTERM, up to STOP_GRACE_SECONDS to finish, then SIGKILL to its whole group. The
        supervisor is awaited, never cancelled, so no restart can slip past the stop."""
        self._stopping.set()
        process = self._process
        if process is not None:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            signal_group(process.pid, signal.SIGKILL)
        if self._task is not None:
            await self._task
        if self._process is not None and self._process is not process:
            signal_group(self._process.pid, signal.SIGKILL)


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


async def wait_for_gateway(url: str, nonce: str | None = None) -> None:
    """Until `url` answers /api/health, with `nonce` as its `instance` when given: another
    server answering on the same port (another stack) never counts as this one's gateway."""
    async with httpx.AsyncClient() as client:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await client.get(f"{url}/api/health", timeout=1)
                if response.status_code == 200 and (
                    nonce is None or response.json().get("instance") == nonce
                ):
                    return
            await asyncio.sleep(0.2)


async def wait_for_consumers(
    js: JetStreamContext, durables: tuple[tuple[str, str], ...] = DURABLES
) -> None:
    """Services are ready once each durable consumer has a pull request waiting. A busy or
    still electing JetStream answers late or 503: asked again (the caller bounds the wait)."""
    pending = set(durables)
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


Progress = Callable[[str], None]


async def run_stack(
    settings: LauncherSettings,
    after_start: Callable[[StackInfo], Awaitable[None]] | None = None,
    *,
    keep_sandboxes: bool = False,
    progress: Progress = print,
) -> None:
    """Run the stack until `after_start` returns (or, without one, until SIGINT/SIGTERM), then
    stop every child and, unless `keep_sandboxes`, remove the docker sandboxes it started.
    StackRunning when another `up` holds the data dir; StartupFailed when a child cannot
    start, with its log's last lines."""
    stop = _stop_on_signals()
    data_dir = await asyncio.to_thread(Path(settings.data_dir).resolve)
    lock = hold_lock(data_dir)  # before anything in the data dir is touched
    children: list[Child] = []
    nats_server: NatsServer | None = None
    nats_keeper: asyncio.Task[None] | None = None
    try:
        started = time.time()
        logs = data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        pids = data_dir / "pids"
        api_key = ensure_api_key(data_dir / "api_keys")
        # Before anything starts: may raise UnsandboxedRefused.
        unsandboxed = await runner_may_run_unsandboxed(os.environ, data_dir / "api_keys")
        bus = data_dir / "bus"
        credentials = bus_auth.new_credentials(bus)
        write_nats_config(bus / "nats.conf", credentials)
        nats_log = data_dir / "nats" / "nats-server.log"
        nats_server = NatsServer(
            data_dir / "nats", port=settings.nats_port, config_file=bus / "nats.conf"
        )
        progress(f"starting nats-server on port {settings.nats_port}")
        try:
            nats_server.start()
        except (RuntimeError, TimeoutError) as error:
            raise StartupFailed(
                f"nats-server did not start ({error}); is port {settings.nats_port} in use? "
                f"Free it or set TASKBUS_NATS_PORT. The last lines of {nats_log}:\n"
                + log_tail(nats_log)
            ) from None
        _write_nats_pid_file(nats_server, pids / "nats-server.pid")
        nats_keeper = asyncio.create_task(
            _restart_nats_when_it_exits(nats_server, pids / "nats-server.pid"), name="nats-keeper"
        )
        nc = await connect(nats_server.url, "taskbus-launcher", credentials[bus_auth.ADMIN])
        await ensure_streams(nc.jetstream(), limits=stream_limits_from_env())
        progress(f"ready    nats-server      {nats_server.url}")

        nonce = secrets.token_hex(16)
        gateway_url = f"http://127.0.0.1:{settings.port}"
        starting = UpState(
            pid=os.getpid(),
            data_dir=str(data_dir),
            gateway_url=gateway_url,
            nats_url=nats_server.url,
            nonce=nonce,
        )
        write_state(data_dir, starting)
        env = _services_env(settings, data_dir, nats_server.url, keep_sandboxes)
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
            await _starting(wait_for_port(model_port), children, stop)
            progress(f"ready    scripted model   http://127.0.0.1:{model_port}/v1")
            env.update(scripted_model_env(f"http://127.0.0.1:{model_port}/v1"))

        for service in SERVICES:
            name = service.replace("_", "-")
            service_env = {
                **without_secrets_it_does_not_need(env, service),
                CREDENTIALS_FILE_ENV: str(bus_auth.credential_file(bus, service)),
            }
            if service == "runtime_runner" and unsandboxed:
                service_env[ALLOW_UNSANDBOXED_ENV] = "1"
            if service == "gateway":
                service_env[NONCE_ENV] = nonce
            else:  # /metrics on a free loopback port each, named in /api/health
                service_env["TASKBUS_METRICS_PORT"] = "0"
            child = Child(
                name,
                [sys.executable, "-m", f"taskbus.{service}"],
                service_env,
                logs / f"{name}.log",
                pids / f"{name}.pid",
            )
            children.append(child)
            child.start()

        js = nc.jetstream()
        runner_id = env.get("TASKBUS_RUNNER_ID", "default")
        runner: list[RunnerInfo] = []

        async def runner_ready() -> str:
            runner.append(await wait_for_runner(js, runner_id, started))
            return f"{runner[0].backend} backend, {runner[0].isolation.value}"

        async def ready(name: str, wait: Awaitable[object], detail: str = "") -> None:
            said = await wait
            progress(f"ready    {name:<16} {said if isinstance(said, str) else detail}")

        await _starting(
            asyncio.gather(
                ready("event-store", wait_for_consumers(js, EVENT_STORE_DURABLES)),
                ready("session-manager", wait_for_consumers(js, SESSION_MANAGER_DURABLES)),
                ready("runtime-runner", runner_ready()),
                ready("gateway", wait_for_gateway(gateway_url, nonce), gateway_url),
            ),
            children,
            stop,
        )
        await nc.drain()
        info = StackInfo(
            gateway_url=gateway_url,
            nats_url=nats_server.url,
            api_key=api_key,
            scripted_model=scripted,
            runner=runner[0],
        )
        write_state(data_dir, msgspec.structs.replace(starting, ready=True))
        config = save_config(ClientConfig(url=gateway_url, api_key=api_key, data_dir=str(data_dir)))
        if after_start is not None:
            await _unless_stopped(after_start(info), stop)
        else:
            _print_banner(info, logs, bus, config)
            await stop.wait()
    except Stopped:
        pass  # Ctrl-C while starting: stop what did start
    finally:
        if stop.is_set():
            progress("Stopping Taskbus...")
        if nats_keeper is not None:
            await cancel_and_wait(nats_keeper)
        # Side by side: each service stops on its own (unfinished work stays in its stream),
        # so the stack is down in the slowest one's time, not in the sum of them.
        await asyncio.gather(*(child.stop() for child in children))
        if nats_server is not None:
            nats_server.stop()
        if not keep_sandboxes:
            removed = await asyncio.to_thread(remove_sandboxes, sandbox_label(data_dir))
            if removed:
                progress(f"removed {removed} docker sandbox(es) left by the runner")
        (data_dir / STATE_FILE).unlink(missing_ok=True)
        os.close(lock)


def _services_env(
    settings: LauncherSettings, data_dir: Path, nats_url: str, keep_sandboxes: bool
) -> dict[str, str]:
    """What every child gets (each service then loses the secrets it does not need)."""
    env = dict(os.environ)
    env.pop(CREDENTIALS_FILE_ENV, None)  # each service gets its own
    labels = [env.get("TASKBUS_SANDBOX_LABELS", ""), sandbox_label(data_dir)]
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        TASKBUS_NATS_URL=nats_url,
        TASKBUS_PORT=str(settings.port),
        TASKBUS_API_KEYS_FILE=str(data_dir / "api_keys"),
        TASKBUS_SANDBOX_LABELS=",".join(label for label in labels if label),
        # On SIGTERM the runner removes its docker sandboxes, or keeps them to re-attach.
        TASKBUS_REMOVE_SANDBOXES_ON_SHUTDOWN="false" if keep_sandboxes else "true",
    )
    env.setdefault("TASKBUS_CLICKHOUSE_DSN", f"chdb://{data_dir / 'clickhouse'}")
    env.setdefault("TASKBUS_WORKSPACE_ROOT", str(data_dir / "workspaces"))
    # The key that seals users' LLM keys in NATS lives outside it (0600, in the data dir).
    if not env.get("TASKBUS_SECRETS_KEY") and not env.get("TASKBUS_SECRETS_KEY_FILE"):
        env["TASKBUS_SECRETS_KEY_FILE"] = str(ensure_key_file(data_dir / "secrets.key"))
    return env


def _stop_on_signals() -> asyncio.Event:
    """SIGINT (Ctrl-C) and SIGTERM (`taskbus down`) ask for an orderly stop, at any point."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


class Stopped(Exception):
    """A signal asked the stack to stop before it was up."""


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T:
    return await _starting(work, [], stop)


async def _starting(work: Awaitable[T], children: list[Child], stop: asyncio.Event) -> T:
    """`work`'s result within STARTUP_SECONDS, unless a signal stops the stack (Stopped) or a
    child exits first (StartupFailed with its log's last lines)."""
    task = asyncio.ensure_future(work)
    watchers = {
        asyncio.ensure_future(stop.wait()): None,
        **{asyncio.ensure_future(child.exited.wait()): child for child in children},
    }
    try:
        done, _ = await asyncio.wait(
            {task, *watchers},
            timeout=STARTUP_SECONDS if children else None,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in done:
            return task.result()
        if stop.is_set():
            raise Stopped
        for watcher, child in watchers.items():
            if watcher in done and child is not None:
                raise StartupFailed(
                    f"{child.name} exited with code {child.exit_code} while starting; the last "
                    f"lines of {child.log_path}:\n{log_tail(child.log_path)}"
                )
        raise StartupFailed(
            f"the stack was not ready after {STARTUP_SECONDS} s; see the logs in "
            f"{children[0].log_path.parent}"
        )
    finally:
        for pending in (task, *watchers):
            pending.cancel()


def _print_banner(info: StackInfo, logs: Path, bus_dir: Path, config: Path) -> None:
    model = "scripted model (offline, plays a fixed script)" if info.scripted_model else "LLM"
    print(
        f"Taskbus is up.\n"
        f"  gateway   {info.gateway_url}   (OpenAPI: {info.gateway_url}/docs)\n"
        f"  API key   {info.api_key}\n"
        f"  NATS      {info.nats_url}   (one credential per service: {bus_dir})\n"
        f"  model     {model}\n"
        f"  sandboxes {_isolation(info.runner)}\n"
        f"  logs      {logs}\n"
        f'  CLI       {config}   (`taskbus ls`, `taskbus run "<task>"` find the stack there)\n'
        f"Try: curl -H 'Authorization: Bearer {info.api_key}' \\\n"
        f"       {info.gateway_url}/api/conversations\n"
        f"Ctrl-C (or `taskbus down`) stops everything and removes its docker sandboxes.",
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


def load_settings() -> LauncherSettings:
    return settings_from_env(LauncherSettings)
