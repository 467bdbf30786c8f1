"""The docker backend: one container per conversation, its persistent bash a `docker exec`.

The workspace is a bind mount of the conversation's directory on this host (as the local
backend's), so the repository is cloned here with the runner's git and credentials (a local-path
repository is reachable and a network-less sandbox still gets its code), file actions reuse the
host-side workspace code, and the files outlive the container.

Containers hold untrusted code: they run as an unprivileged user (the image's `taskbus`, or the
runner's own uid when the runner is not root; what the runner writes in the workspace is given
to that user), with every capability dropped, no-new-privileges, a read-only root, tmpfs /tmp
and home, the workspace as the only writable mount, and memory, pids and CPU limits always set.
The `docker_runtime` setting picks the OCI runtime: runc, or runsc for gVisor.

A conversation may get a warm container (pool.py) instead of a new one: started before any
conversation asked, bound to an empty directory of its own, it becomes the conversation's by two
renames, its directory to the conversation's workspace and the container to its name (the bind
mount follows the directory, which is never shared), and its idle shell becomes the
conversation's unless the conversation has sandbox secrets. Only a conversation without a
workspace yet takes one; a later sandbox on a kept workspace is started cold, bound to that
workspace. Not under gVisor, whose gofer loses a mount whose host directory was renamed.

The docker SDK blocks, so its calls run on a thread pool of the engine's own; the shell's
stream is the exec's hijacked socket read with asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import docker
import docker.errors
import msgspec
import requests
from docker.utils import kwargs_from_env

from taskbus.contracts import subjects
from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner.docker_frames import FrameDecoder
from taskbus.runtime_runner.limits import SandboxResources, docker_host_limits
from taskbus.runtime_runner.sandbox import (
    IMPORT_SECRETS,
    ActionError,
    OneShotResult,
    SandboxProcess,
    ShellProcess,
    StderrTail,
    sandbox_environment,
    secrets_carrier,
)
from taskbus.runtime_runner.shell import PersistentShell, ShellLimits
from taskbus.runtime_runner.usage import (
    DiskGauge,
    Usage,
    UsageUnavailable,
    docker_stats_usage,
)
from taskbus.runtime_runner.workspace import (
    HostWorkspace,
    HostWorkspaceSandbox,
    conversation_directories,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_MANAGED = "taskbus.managed"
LABEL_CONVERSATION = "taskbus.conversation_id"
LABEL_USER = "taskbus.user_id"
LABEL_RUNNER = "taskbus.runner_id"
# A one-shot container (`run_once`) of this conversation: not managed, as reconcile would take
# it for the conversation's sandbox; it is removed as soon as its program ends.
LABEL_ONE_SHOT = "taskbus.one_shot"
# A warm container (pool.py): its conversation is unknown when it is made, and labels cannot
# change, so once handed over its name (`container_name`) tells whose it is.
LABEL_WARM = "taskbus.warm"
_NAME_PREFIX = "taskbus-"
# The names of warm containers in the pool: the "." keeps them apart from every
# `container_name`, as no conversation id has one.
WARM_NAME_PREFIX = f"{_NAME_PREFIX}warm."
WORKSPACE = "/workspace"
HOME = "/home/taskbus"
# exec: a sandbox may build and run programs in /tmp; nosuid, nodev: nothing there gains rights.
_TMPFS_OPTIONS = "rw,exec,nosuid,nodev,size={megabytes}m,mode={mode}"
_READ_SIZE = 64 * 1024
_ENGINE_THREADS = 32
_EXEC_EXIT_SECONDS = 2.0
# Prints the shell's pid (its process group and session: docker exec starts a new session),
# then becomes the interactive bash, stderr merged so output keeps its order.
_SHELL_COMMAND = [
    "bash",
    "-c",
    IMPORT_SECRETS + 'printf "%s\\n" "$$"; exec bash --norc --noprofile --noediting -i 2>&1',
]
# Kills the process groups of the shells a previous runner started (exec roots have ppid 0).
_KILL_OLD_SHELLS = (
    "ps -eo pid=,ppid=,comm= | while read -r pid ppid comm; do "
    'if [ "$ppid" = 0 ] && [ "$comm" = bash ] && [ "$pid" != "$$" ]; then '
    'kill -KILL -- "-$pid"; fi; done'
)
# Runs "$@" with at most "$0" bytes of its stdout kept; the exit code is the program's.
_CAPPED_OUTPUT = 'set -o pipefail; "$@" | head -c "$0"'
# Prints its pid (its process group: docker exec starts a new session), then becomes `$@`.
_PROGRAM_COMMAND = ["bash", "-c", 'printf "%s\\n" "$$"; exec "$@"', "program"]


class EngineUnavailable(Exception):
    pass


class DockerEngine:
    """The docker SDK's blocking low-level client, called off the event loop."""

    def __init__(self, api: Any, cpus: int) -> None:
        self.api = api
        self.cpus = cpus
        self._executor = ThreadPoolExecutor(_ENGINE_THREADS, thread_name_prefix="docker")

    @classmethod
    async def connect(cls, image: str) -> DockerEngine:
        """The engine of DOCKER_HOST (or the local socket), if it answers and has `image`."""
        try:
            api = await asyncio.to_thread(
                partial(docker.APIClient, max_pool_size=_ENGINE_THREADS, **kwargs_from_env())
            )
            info = await asyncio.to_thread(api.info)
        except docker.errors.DockerException as error:
            raise EngineUnavailable(f"no Docker engine answers: {error}") from None
        try:
            await asyncio.to_thread(api.inspect_image, image)
        except docker.errors.ImageNotFound:
            api.close()
            raise EngineUnavailable(
                f"the sandbox image {image} is missing (build it: just sandbox-image)"
            ) from None
        return cls(api, int(info.get("NCPU") or 1))

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args, **kwargs))

    async def run(self, container: str, script: str) -> tuple[int, bytes]:
        """Run a `bash -c` script in the container; its exit code and output."""

        def blocking() -> tuple[int, bytes]:
            exec_id = self.api.exec_create(container, ["bash", "-c", script])["Id"]
            output = self.api.exec_start(exec_id)
            return int(self.api.exec_inspect(exec_id)["ExitCode"]), output

        return await self.call(blocking)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()


class DockerShellProcess:
    """`bash -i` in a container through an exec whose stdin/stdout are the hijacked socket."""

    def __init__(
        self,
        engine: DockerEngine,
        container: str,
        exec_id: str,
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._engine = engine
        self._container = container
        self._exec_id = exec_id
        self._reader, self._writer = connection
        self._frames = FrameDecoder()
        self._pending = b""
        self.pid = 0
        self._exit_status: asyncio.Task[int] | None = None

    @classmethod
    async def spawn(
        cls, engine: DockerEngine, container: str, environment: dict[str, str]
    ) -> DockerShellProcess:
        exec_id, connection = await _open_exec(engine, container, _SHELL_COMMAND, environment)
        process = cls(engine, container, exec_id, connection)
        await process._read_pid()
        return process

    async def _read_pid(self) -> None:
        while b"\n" not in self._pending:
            data = await self._reader.read(_READ_SIZE)
            if not data:
                raise RuntimeError("the shell exited while starting")
            self._pending += self._frames.feed(data)
        line, _, self._pending = self._pending.partition(b"\n")
        self.pid = int(line)

    def disconnect(self) -> None:
        """Close its stream: the shell reads the end of its input and exits (one nobody will
        use, as a warm container's shell with the wrong environment)."""
        self._writer.close()

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._writer.write(data)
            await self._writer.drain()

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        while True:
            try:
                data = await self._reader.read(_READ_SIZE)
            except ConnectionError:
                return b""
            if not data:
                return b""
            if payload := self._frames.feed(data):
                return payload

    async def _in_container(self, script: str) -> None:
        """Run a signalling script; a paused or removed container just cannot be signalled."""
        try:
            await self._engine.run(self._container, script)
        except docker.errors.APIError as error:
            # 404 removed, 409 stopped or paused: there is nothing to signal right now.
            level = logging.DEBUG if error.status_code in (404, 409) else logging.WARNING
            logger.log(level, "cannot signal the shell in %s: %s", self._container, error)

    async def signal_group(self, signum: signal.Signals) -> None:
        await self._in_container(f"kill -{signum.name.removeprefix('SIG')} -- -{self.pid}")

    async def kill_children(self) -> None:
        await self._in_container(
            f'for p in $(pgrep -g {self.pid}); do [ "$p" = {self.pid} ] || kill -KILL "$p"; done'
        )

    async def terminate(self) -> int:
        if self._exit_status is None:
            self._exit_status = asyncio.create_task(self._terminate())
        return await asyncio.shield(self._exit_status)

    async def _terminate(self) -> int:
        await self.signal_group(signal.SIGKILL)
        self._writer.close()
        deadline = time.monotonic() + _EXEC_EXIT_SECONDS
        while time.monotonic() < deadline:
            try:
                state = await self._engine.call(self._engine.api.exec_inspect, self._exec_id)
            except docker.errors.APIError:
                return -1
            if not state["Running"]:
                return int(state["ExitCode"] if state["ExitCode"] is not None else -1)
            await asyncio.sleep(0.02)
        return -1


async def _open_exec(
    engine: DockerEngine, container: str, command: list[str], environment: dict[str, str]
) -> tuple[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """An exec of `command` in the workspace, stdin attached (tty off), as a stream."""
    api = engine.api
    created = await engine.call(
        api.exec_create,
        container,
        command,
        stdin=True,
        tty=False,
        environment=environment,
        workdir=WORKSPACE,
    )
    exec_id = created["Id"]
    hijacked = await engine.call(api.exec_start, exec_id, socket=True)
    raw: socket.socket = hijacked._sock
    # asyncio owns a duplicate; closing the SDK's object must not end the stream.
    stream = raw.dup()
    hijacked.close()
    return exec_id, await asyncio.open_connection(sock=stream)


class DockerProgram:
    """A program in a container (`Sandbox.spawn_process`) through an exec, its stdout and
    stderr told apart by frame."""

    def __init__(
        self,
        engine: DockerEngine,
        container: str,
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._engine = engine
        self._container = container
        self._reader, self._writer = connection
        self._frames = FrameDecoder()
        self._stdout = b""
        self._stderr = StderrTail()
        self._pid: int | None = None

    @classmethod
    async def spawn(
        cls, engine: DockerEngine, container: str, argv: list[str], environment: dict[str, str]
    ) -> DockerProgram:
        _, connection = await _open_exec(engine, container, [*_PROGRAM_COMMAND, *argv], environment)
        program = cls(engine, container, connection)
        line = b""
        while b"\n" not in line:
            data = await program._receive()
            if not data:
                raise ActionError("process_failed", program.stderr_tail() or "exec failed")
            line += data
        pid, _, program._stdout = line.partition(b"\n")
        program._pid = int(pid)
        return program

    async def _receive(self) -> bytes:
        """Next stdout bytes off the socket (stderr goes to the tail); b"" at its end."""
        while True:
            try:
                data = await self._reader.read(_READ_SIZE)
            except ConnectionError:
                return b""
            if not data:
                return b""
            stdout = b""
            for stream, payload in self._frames.frames(data):
                if stream == 2:
                    self._stderr.add(payload)
                else:
                    stdout += payload
            if stdout:
                return stdout

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._writer.write(data)
            await self._writer.drain()

    async def read(self) -> bytes:
        if self._stdout:
            data, self._stdout = self._stdout, b""
            return data
        return await self._receive()

    def stderr_tail(self) -> str:
        return self._stderr.text()

    async def terminate(self) -> None:
        if self._pid is not None:
            with contextlib.suppress(docker.errors.APIError):  # the container may be gone
                await self._engine.run(self._container, f"kill -KILL -- -{self._pid}")
        self._writer.close()


def _read_capped(chunks: Iterator[bytes], max_bytes: int) -> tuple[bytes, bool]:
    """At most `max_bytes` of a stream of chunks, and whether there was more."""
    output = b""
    for chunk in chunks:
        output += chunk
        if len(output) > max_bytes:
            break
    if hasattr(chunks, "close"):
        chunks.close()
    return output[:max_bytes], len(output) > max_bytes


class WarmContainer(msgspec.Struct, frozen=True):
    """A started container of the warm pool, the empty directory bound as its workspace, and
    a shell already started in it without any secret (addressed by the container's id, which
    a rename keeps): an exec costs ~90 ms, most of a warm start."""

    name: str
    workspace: Path
    shell: DockerShellProcess


class WarmSource(Protocol):
    def take(self, resources: SandboxResources) -> WarmContainer | None:
        """A warm container made with exactly `resources`, now the caller's; None: none."""
        ...


class DockerSandboxConfig:
    """What every container of this runner shares."""

    def __init__(
        self,
        engine: DockerEngine,
        image: str,
        runner_id: str,
        labels: dict[str, str],
        *,
        user: tuple[int, int] | None,
        runtime: str = "runc",
    ) -> None:
        self.engine = engine
        self.image = image
        self.runner_id = runner_id
        self.labels = labels
        # The (uid, gid) containers run as; None: the runner's own (as `sandbox_user`).
        self.user = user
        self.runtime = runtime
        # Where sandboxes of new conversations take a started container from (the warm pool).
        self.warm: WarmSource | None = None

    def container_user(self) -> tuple[int, int]:
        return self.user or (os.getuid(), os.getgid())

    def host_config(self, workspace: Path, resources: SandboxResources) -> Any:
        """The hardening and limits every container runs under, `workspace` bound rw."""
        uid, gid = self.container_user()
        megabytes = resources.memory_mb
        tmpfs = {
            "/tmp": _TMPFS_OPTIONS.format(megabytes=megabytes, mode="1777"),
            HOME: _TMPFS_OPTIONS.format(megabytes=megabytes, mode="0700") + f",uid={uid},gid={gid}",
        }
        return self.engine.api.create_host_config(
            init=True,  # reaps orphans, which would otherwise count against the pids limit
            binds={str(workspace): {"bind": WORKSPACE, "mode": "rw"}},
            read_only=True,
            tmpfs=tmpfs,  # in the memory limit, whatever their size
            # None added back: the shell, its commands and the signalling scripts all run as
            # the one unprivileged user, which needs no capability to signal its own processes.
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            runtime=self.runtime,
            **docker_host_limits(resources, self.engine.cpus),
        )

    async def start_container(
        self, name: str, labels: dict[str, str], workspace: Path, resources: SandboxResources
    ) -> str:
        """Create and start a sandbox container, returning its id; raises APIError 409 if
        `name` is taken."""
        api = self.engine.api
        uid, gid = self.container_user()
        try:
            created = await self.engine.call(
                api.create_container,
                self.image,
                command=["sleep", "infinity"],
                name=name,
                labels={
                    **self.labels,
                    LABEL_MANAGED: "true",
                    LABEL_RUNNER: self.runner_id,
                    **labels,
                },
                user=f"{uid}:{gid}",
                working_dir=WORKSPACE,
                host_config=self.host_config(workspace, resources),
            )
        except docker.errors.ImageNotFound:
            raise ActionError(
                "sandbox_image_missing",
                f"the sandbox image {self.image} is missing (build it: just sandbox-image)",
            ) from None
        await self.engine.call(api.start, name)
        return str(created["Id"])

    async def spawn_shell(
        self, container: str, secrets: dict[str, str] | None = None
    ) -> DockerShellProcess:
        """The persistent shell's process in `container`, exporting `secrets`."""
        environment = {**sandbox_environment(HOME), **secrets_carrier(secrets or {})}
        return await DockerShellProcess.spawn(self.engine, container, environment)


def container_name(conversation_id: str) -> str:
    return f"{_NAME_PREFIX}{conversation_id}"


def conversation_of(container: dict[str, Any]) -> str | None:
    """The conversation a managed container (as `containers()` lists it) serves: its label, or
    for a handed-over warm one its name; None for a warm one still in the pool."""
    labelled = container["Labels"].get(LABEL_CONVERSATION)
    if labelled is not None:
        return str(labelled)
    name = str(container["Names"][0]).lstrip("/").removeprefix(_NAME_PREFIX)
    return name if subjects.is_valid_conversation_id(name) else None


class DockerSandbox(HostWorkspaceSandbox):
    backend: ClassVar[str] = "docker"

    def __init__(
        self,
        config: DockerSandboxConfig,
        conversation_id: str,
        user_id: str,
        workspace_root: Path,
        resources: SandboxResources,
        shell_limits: ShellLimits,
        clone_seconds: float,
    ) -> None:
        self._config = config
        self._engine = config.engine
        self._conversation_id = conversation_id
        self._user_id = user_id
        self._host_workspace, self._host_home = conversation_directories(
            workspace_root, conversation_id
        )
        self._resources = resources
        self._clone_seconds = clone_seconds
        self.sandbox_id = container_name(conversation_id)
        self.workspace = WORKSPACE
        self.files = HostWorkspace(self._host_workspace, WORKSPACE, config.user)
        self._disk = DiskGauge(self._host_workspace)
        self.shell = PersistentShell(self._spawn_shell, shell_limits, WORKSPACE)
        # The warm container's shell, until the first `_spawn_shell` takes it.
        self._warm_shell: DockerShellProcess | None = None

    async def _spawn_shell(self) -> ShellProcess:
        secrets = await self._sandbox_secrets()
        warm, self._warm_shell = self._warm_shell, None
        if warm is not None:
            if not secrets:
                return warm  # started by the pool, with the same environment
            warm.disconnect()  # started without the secrets this conversation has
        return await self._config.spawn_shell(self.sandbox_id, secrets)

    async def spawn_process(self, argv: list[str], environment: dict[str, str]) -> SandboxProcess:
        return await DockerProgram.spawn(
            self._engine, self.sandbox_id, argv, {**sandbox_environment(HOME), **environment}
        )

    async def start(self, repository_url: str | None, branch: str | None) -> None:
        warm = await self._take_warm()
        # After a warm hand-over too: the clone lands in the directory the container sees.
        await self._prepare_workspace(self._host_home, repository_url, branch, self._clone_seconds)
        if not warm:
            await self._create_container()
        await self.shell.start()

    async def _take_warm(self) -> bool:
        """Make a warm container this conversation's, if the pool has one that fits and the
        conversation has no workspace yet (an existing one must be bound by a new container)."""
        pool = self._config.warm
        if pool is None or await asyncio.to_thread(self._host_workspace.exists):
            return False
        warm = pool.take(self._resources)
        if warm is None:
            return False
        try:
            # The workspace is made by this rename: the container's mount follows the directory.
            await asyncio.to_thread(self._host_workspace.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(_rename_directory, warm.workspace, self._host_workspace)
            await self._rename_container(warm.name)
        except (OSError, docker.errors.APIError) as error:
            logger.warning("warm container %s not handed over: %s", warm.name, error)
            warm.shell.disconnect()
            with contextlib.suppress(docker.errors.NotFound):
                await self._engine.call(self._engine.api.remove_container, warm.name, force=True)
            await asyncio.to_thread(_remove_empty, warm.workspace)
            return False
        self._warm_shell = warm.shell
        return True

    async def _rename_container(self, name: str) -> None:
        api = self._engine.api
        try:
            await self._engine.call(api.rename, name, self.sandbox_id)
        except docker.errors.APIError as error:
            if error.status_code != 409:
                raise
            await self._remove_container()  # of an earlier, failed start of this conversation
            await self._engine.call(api.rename, name, self.sandbox_id)

    async def _create_container(self) -> None:
        labels = {LABEL_CONVERSATION: self._conversation_id, LABEL_USER: self._user_id}
        start = partial(
            self._config.start_container,
            self.sandbox_id,
            labels,
            self._host_workspace,
            self._resources,
        )
        try:
            await start()
        except docker.errors.APIError as error:
            if error.status_code != 409:
                raise
            # A container of an earlier, failed start of this conversation.
            await self._remove_container()
            await start()

    async def reattach(self) -> bool:
        """Take over this conversation's existing container after a runner restart: stop what
        the previous runner's shell left running; the next command starts a new shell.
        Returns whether the container is paused."""
        api = self._engine.api
        container = await self._engine.call(api.inspect_container, self.sandbox_id)
        state = container["State"]
        if not state["Running"] and not self._binds_workspace(container):
            # A stopped warm container: started again it would bind its pool directory, which
            # is gone (docker would make an empty one), not the workspace it was renamed to.
            await self._create_container()
            return False
        if state["Paused"]:
            await self._engine.call(api.unpause, self.sandbox_id)
        elif not state["Running"]:
            await self._engine.call(api.start, self.sandbox_id)
        await self._engine.run(self.sandbox_id, _KILL_OLD_SHELLS)
        if state["Paused"]:
            await self._engine.call(api.pause, self.sandbox_id)
        return bool(state["Paused"])

    def _binds_workspace(self, container: dict[str, Any]) -> bool:
        return any(
            mount.get("Destination") == WORKSPACE
            and mount.get("Source") == str(self._host_workspace)
            for mount in container.get("Mounts") or []
        )

    async def usage(self) -> Usage:
        """The engine's stats of the container (its cgroup's figures) and the workspace's size."""
        api = self._engine.api
        try:
            stats = await self._engine.call(api.stats, self.sandbox_id, stream=False, one_shot=True)
        except docker.errors.APIError as error:
            raise UsageUnavailable(f"no stats for {self.sandbox_id}: {error}") from None
        disk = await asyncio.to_thread(self._disk.bytes)
        return msgspec.structs.replace(docker_stats_usage(stats), disk_bytes=disk)

    async def run_once(
        self, argv: list[str], *, seconds: float, max_output_bytes: int
    ) -> OneShotResult:
        """An exec in the running container; when it is gone (given back) or paused, a one-shot
        container of the same image, user, hardening and limits, with no network and the
        workspace bound, removed after."""
        if not await asyncio.to_thread(self._host_workspace.is_dir):
            raise ActionError("file_not_found", "the workspace is gone")
        try:
            state = (await self._engine.call(self._engine.api.inspect_container, self.sandbox_id))[
                "State"
            ]
            live = bool(state["Running"]) and not state["Paused"]
        except docker.errors.NotFound:
            live = False
        # Output is cut at its source, so neither the exec's stream nor the container's log
        # (on the host's disk) grows past the cap.
        capped = ["bash", "-c", _CAPPED_OUTPUT, str(max_output_bytes + 1), *argv]
        if live:
            # `timeout` (coreutils) kills it: an exec cannot be killed through the engine.
            command = ["timeout", "-s", "KILL", str(max(1, math.ceil(seconds))), *capped]
            return await self._engine.call(self._exec_once, command, max_output_bytes)
        return await self._engine.call(self._container_once, capped, seconds, max_output_bytes)

    def _exec_once(self, command: list[str], max_output_bytes: int) -> OneShotResult:
        api = self._engine.api
        exec_id = api.exec_create(
            self.sandbox_id,
            command,
            stdout=True,
            stderr=False,
            environment=sandbox_environment(HOME),
            workdir=WORKSPACE,
        )["Id"]
        output, truncated = _read_capped(api.exec_start(exec_id, stream=True), max_output_bytes)
        state = api.exec_inspect(exec_id)
        exit_code = -1 if state["Running"] or state["ExitCode"] is None else state["ExitCode"]
        return OneShotResult(exit_code=int(exit_code), output=output, truncated=truncated)

    def _container_once(
        self, argv: list[str], seconds: float, max_output_bytes: int
    ) -> OneShotResult:
        api = self._engine.api
        uid, gid = self._config.container_user()
        name = f"{self.sandbox_id}-once-{secrets.token_hex(4)}"
        offline = msgspec.structs.replace(self._resources, network=NetworkMode.NONE)
        api.create_container(
            self._config.image,
            command=argv,
            name=name,
            labels={**self._config.labels, LABEL_ONE_SHOT: self._conversation_id},
            user=f"{uid}:{gid}",
            working_dir=WORKSPACE,
            environment=sandbox_environment(HOME),
            host_config=self._config.host_config(self._host_workspace, offline),
        )
        try:
            api.start(name)
            try:
                exit_code = int(api.wait(name, timeout=seconds)["StatusCode"])
            except requests.exceptions.RequestException:  # the wait timed out
                return OneShotResult(exit_code=-1, output=b"")
            logs = api.logs(name, stdout=True, stderr=False, stream=True)
            output, truncated = _read_capped(logs, max_output_bytes)
            return OneShotResult(exit_code=exit_code, output=output, truncated=truncated)
        finally:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(name, force=True)

    async def pause(self) -> None:
        await self._engine.call(self._engine.api.pause, self.sandbox_id)

    async def resume(self) -> None:
        await self._engine.call(self._engine.api.unpause, self.sandbox_id)

    async def detach(self) -> None:
        """The container stays for the next runner; only this runner's shell ends."""
        await self.shell.close()

    async def close(self) -> None:
        await self._remove_container()  # first: a paused container cannot run `kill`
        await self.shell.close()

    async def _remove_container(self) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await self._engine.call(self._engine.api.remove_container, self.sandbox_id, force=True)


def _rename_directory(source: Path, target: Path) -> None:
    """rename(2), but never onto an existing directory (which it would silently replace when
    empty): a workspace is the conversation's own from its first file on."""
    if target.exists():
        raise FileExistsError(f"{target} exists")
    os.rename(source, target)


def _remove_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()
