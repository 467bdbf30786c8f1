"""What every sandbox backend offers: a persistent shell, workspace files, pause and removal.

A backend supplies a way to start `bash` with piped stdin/stdout (`ShellProcess`) and the file
primitives; the command protocol (`shell.PersistentShell`) and the file editor (`files.py`) are
shared by all backends.
"""

from __future__ import annotations

import abc
import re
import shlex
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar, Protocol

import msgspec

from taskbus.contracts.events import CommandTimeout
from taskbus.runtime_runner.usage import Usage


class ActionError(Exception):
    """An action that could not be carried out; becomes an `ErrorObservation` with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CommandRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The parts of a `CmdRunAction` the shell needs."""

    command: str
    is_input: bool = False
    blocking: bool = False
    timeout: float | None = None
    cwd: str | None = None


class CommandOutcome(msgspec.Struct, frozen=True, kw_only=True):
    content: str
    exit_code: int
    timed_out: CommandTimeout
    cwd: str
    truncated_bytes: int = 0


OutputSink = Callable[[str], Awaitable[None]]


class ShellProcess(Protocol):
    """A running `bash` whose stdin and stdout (with stderr merged) are pipes, however started."""

    async def write(self, data: bytes) -> None: ...

    async def read(self) -> bytes:
        """Next output bytes; b"" once the shell has exited."""
        ...

    async def signal_group(self, signum: signal.Signals) -> None:
        """Send `signum` to the shell and every process it started."""
        ...

    async def kill_children(self) -> None:
        """SIGKILL every process the shell started, leaving the shell itself alive."""
        ...

    async def terminate(self) -> int:
        """Kill the shell and its processes; returns the shell's exit status."""
        ...


ShellSpawner = Callable[[], Awaitable[ShellProcess]]


class SandboxProcess(Protocol):
    """A program started in the sandbox (`Sandbox.spawn_process`): its stdin and stdout are
    pipes; of its stderr only the tail is kept, to say why the program failed."""

    async def write(self, data: bytes) -> None: ...

    async def read(self) -> bytes:
        """Next stdout bytes; b"" once the program has closed its stdout."""
        ...

    def stderr_tail(self) -> str: ...

    async def terminate(self) -> None:
        """Kill the program and every process it started."""
        ...


class StderrTail:
    """The last `limit` bytes a program wrote to its stderr."""

    def __init__(self, limit: int = 2048) -> None:
        self._limit = limit
        self._data = b""

    def add(self, data: bytes) -> None:
        self._data = (self._data + data)[-self._limit :]

    def text(self) -> str:
        return self._data.decode(errors="replace").strip()


class OneShotResult(msgspec.Struct, frozen=True, kw_only=True):
    """What `Sandbox.run_once` saw: exit code (-1 when killed at the timeout) and stdout."""

    exit_code: int
    output: bytes
    truncated: bool = False


class Sandbox(abc.ABC):
    """One conversation's isolated place to run commands and edit files."""

    backend: ClassVar[str]
    sandbox_id: str
    # The workspace directory as commands inside the sandbox see it.
    workspace: str

    @abc.abstractmethod
    async def start(self, repository: str | None, branch: str | None) -> None:
        """Create the sandbox, clone `repository` into the workspace, start the shell.

        Raises `ActionError("clone_failed", ...)` when the clone fails.
        """

    @abc.abstractmethod
    async def run_command(self, request: CommandRequest, on_output: OutputSink) -> CommandOutcome:
        """Run a command (or feed/wait on the running one) in the persistent shell."""

    @abc.abstractmethod
    def resolve(self, path: str) -> str:
        """The canonical absolute form of a path given relative to the workspace.

        Raises `ActionError("path_outside_workspace", ...)` for paths the sandbox may not touch.
        """

    @abc.abstractmethod
    async def read_bytes(self, path: str) -> bytes: ...

    @abc.abstractmethod
    async def write_bytes(self, path: str, data: bytes) -> None:
        """Write a file, creating missing parent directories."""

    @abc.abstractmethod
    async def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    async def is_dir(self, path: str) -> bool: ...

    @abc.abstractmethod
    async def list_tree(self, path: str, depth: int) -> list[str]:
        """Non-hidden entries under a directory, `depth` levels deep, relative to it."""

    @abc.abstractmethod
    async def spawn_process(self, argv: list[str], environment: dict[str, str]) -> SandboxProcess:
        """Start `argv` in the sandbox, confined as its shell is (same user, namespaces, limits
        and network policy; pause and close reach it too), in the workspace, with the
        sandbox's environment plus `environment` (e.g. an MCP server, or the relay that opens a
        TCP connection from inside the sandbox)."""

    @abc.abstractmethod
    async def usage(self) -> Usage:
        """What the sandbox uses of the host now (see `usage.py`); raises `UsageUnavailable`
        when it cannot be measured."""

    @abc.abstractmethod
    async def run_once(
        self, argv: list[str], *, seconds: float, max_output_bytes: int
    ) -> OneShotResult:
        """Run `argv` to completion in the workspace, confined as the shell is but with no
        network, whether or not the sandbox is running (a one-shot sandbox when it is not):
        the runner's way to run tools (git) on files the sandbox may have booby-trapped.
        Only stdout is kept, at most `max_output_bytes`; killed after `seconds`."""

    @abc.abstractmethod
    async def pause(self) -> None: ...

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every process of the sandbox and remove it; its workspace files stay."""

    async def detach(self) -> None:
        """Let go of the sandbox as the runner shuts down; backends that outlive the runner keep
        it for the next runner to re-attach."""
        await self.close()


# The user's sandbox secrets reach the shell in one variable of a name nothing acts on, holding
# `export NAME='value'` lines the shell runs first (`IMPORT_SECRETS`), then forgets: never as
# variables of their own in the environment of a process started on this host (bwrap), where a
# name such as LD_PRELOAD would act on the host before the sandbox exists.
SECRETS_VARIABLE = "TASKBUS_SANDBOX_SECRETS"
IMPORT_SECRETS = f'eval "${{{SECRETS_VARIABLE}-}}"; unset {SECRETS_VARIABLE}; '
_ENVIRONMENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def secrets_carrier(secrets: Mapping[str, str]) -> dict[str, str]:
    """`secrets` as the environment entry `IMPORT_SECRETS` exports them from."""
    lines = []
    for name, value in sorted(secrets.items()):
        if not _ENVIRONMENT_NAME.fullmatch(name):
            raise ValueError(f"{name[:80]!r} is not an environment variable's name")
        lines.append(f"export {name}={shlex.quote(value)}")
    return {SECRETS_VARIABLE: "\n".join(lines)} if lines else {}


def sandbox_environment(home: str) -> dict[str, str]:
    """The shell's environment: nothing of the runner's own (its secrets) leaks into a sandbox."""
    return {
        "HOME": home,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PAGER": "cat",
        "GIT_PAGER": "cat",
        "PYTHONUNBUFFERED": "1",
    }
