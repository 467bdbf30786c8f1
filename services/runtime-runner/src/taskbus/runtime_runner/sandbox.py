"""What every sandbox backend offers: a persistent shell, workspace files, pause and removal.

A backend supplies a way to start `bash` with piped stdin/stdout (`ShellProcess`) and the file
primitives; the command protocol (`shell.PersistentShell`) and the file editor (`files.py`) are
shared by all backends.
"""

from __future__ import annotations

import abc
import signal
from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol

import msgspec

from taskbus.contracts.events import CommandTimeout


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
