"""The local backend: a process sandbox in a per-conversation directory, for machines without
Docker. With bubblewrap (`bubblewrap.py`) each sandbox has its own namespaces and an
unprivileged uid; without, it is a process group with limits only, which the runner allows only
when the operator says so (`allow_unsandboxed`).

Every process of a sandbox carries `TASKBUS_SANDBOX=<sandbox id>` in its environment, inherited
through forks, new sessions (`setsid`) and daemonising alike. Pause, resume and close signal
every process so marked, as well as the shell's process group, so nothing a command started
keeps running in a paused or removed sandbox. The shell dies with the runner (PDEATHSIG), but
what it started does not: the runner taking the workspace over after a restart (`reattach`)
kills the marked processes the dead runner's shell left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from pathlib import Path
from typing import ClassVar

import msgspec

from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner import bubblewrap
from taskbus.runtime_runner.cgroups import SandboxCgroup
from taskbus.runtime_runner.limits import SandboxResources
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
from taskbus.runtime_runner.usage import DiskGauge, Usage, read_cgroup, read_processes
from taskbus.runtime_runner.workspace import (
    HostWorkspace,
    HostWorkspaceSandbox,
    conversation_directories,
)

_READ_SIZE = 64 * 1024
SANDBOX_MARKER = "TASKBUS_SANDBOX"
_SHELL = ["bash", "-c", IMPORT_SECRETS + "exec bash --norc --noprofile --noediting -i"]


class LocalConfinement:
    """How a local sandbox's processes are held: under bubblewrap or not, as which user (a root
    runner's sandboxes drop to an unprivileged one), with which limits."""

    def __init__(
        self,
        *,
        bubblewrap: bool,
        user: tuple[int, int] | None,
        resources: SandboxResources,
        max_file_bytes: int,
        toolbox: Path | None = None,
    ) -> None:
        self.bubblewrap = bubblewrap
        self.user = user if bubblewrap else None
        self.resources = resources
        self.max_file_bytes = max_file_bytes
        # A host directory of programs' libraries (e.g. the mcp SDK), on sandboxes' PYTHONPATH.
        self.toolbox = toolbox


class _Launch(msgspec.Struct, frozen=True, kw_only=True):
    """How to start a program confined as a sandbox's shell is."""

    argv: list[str]
    cwd: Path
    environment: dict[str, str]
    setup: bubblewrap.ChildSetup

    async def start(self, stdin: int, stderr: int) -> asyncio.subprocess.Process:
        """The process, leader of its own session (so its whole group can be signalled), with
        stdout a pipe."""
        return await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=self.cwd,
            env=self.environment,
            start_new_session=True,
            preexec_fn=self.setup,
        )


class _Piped:
    """A local process spoken to through its stdin and stdout pipes."""

    _process: asyncio.subprocess.Process

    async def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._process.stdin.write(data)
            await self._process.stdin.drain()

    async def read(self) -> bytes:
        assert self._process.stdout is not None
        return await self._process.stdout.read(_READ_SIZE)


class LocalShellProcess(_Piped):
    """`bash -i` on pipes (or the `bwrap` that runs it), leader of its own session and group."""

    def __init__(self, process: asyncio.subprocess.Process, wrapped: bool) -> None:
        self._process = process
        # Under bwrap the leader is bwrap, whose child is the sandbox's init (bwrap again); the
        # shell is that init's first child, leading a process group of its own.
        self._wrapped = wrapped
        self._shell_group: int | None = None if wrapped else process.pid

    @property
    def pid(self) -> int:
        """The leader's pid, also its process group and session id."""
        return self._process.pid

    @classmethod
    async def spawn(cls, launch: _Launch, wrapped: bool) -> LocalShellProcess:
        process = await launch.start(asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT)
        return cls(process, wrapped)

    async def _shell(self) -> int | None:
        """The shell's pid, its group and session id (found once the shell has answered)."""
        if self._shell_group is None:
            self._shell_group = await asyncio.to_thread(_wrapped_shell, self._process.pid)
        return self._shell_group

    async def signal_group(self, signum: signal.Signals) -> None:
        if (shell := await self._shell()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell, signum)

    async def kill_children(self) -> None:
        if (shell := await self._shell()) is None:
            return
        for pid in await asyncio.to_thread(_group_members, shell):
            if pid != shell:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def terminate(self) -> int:
        await self.signal_group(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # bwrap, whose sandbox dies with it
            os.killpg(self._process.pid, signal.SIGKILL)
        return await self._process.wait()


class LocalProgram(_Piped):
    """A program in a local sandbox (`Sandbox.spawn_process`), leader of its own session and
    group (or the bwrap that runs it, whose pid namespace dies with it)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._stderr = StderrTail()
        self._drain = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        assert self._process.stderr is not None
        while data := await self._process.stderr.read(_READ_SIZE):
            self._stderr.add(data)

    def stderr_tail(self) -> str:
        return self._stderr.text()

    async def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        await self._process.wait()
        self._drain.cancel()


def _stat_ids(pid: int) -> tuple[int, int, int] | None:
    """A process' parent id, group id and start time, from /proc; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name: state ppid pgrp ... (starttime is the 20th)
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), int(fields[19])


def _pids() -> list[int]:
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def _group_members(pgid: int) -> list[int]:
    return [pid for pid in _pids() if (ids := _stat_ids(pid)) is not None and ids[1] == pgid]


def _children(parent: int) -> list[int]:
    """The parent's children: listed by the kernel (`/proc/<pid>/task/<pid>/children`, for a
    single-threaded parent as bwrap is), else found in a scan of every process' stat (a kernel
    without that file), which costs the runner milliseconds per sandbox on a busy host."""
    try:
        listed = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    except FileNotFoundError:
        return [pid for pid in _pids() if (ids := _stat_ids(pid)) is not None and ids[0] == parent]
    except OSError:  # the parent is gone
        return []
    return [int(pid) for pid in listed.split()]


def _first_child(parent: int) -> int | None:
    """The earliest started child (orphans re-parented to a sandbox's init come later)."""
    children = {
        pid: ids[2]
        for pid in _children(parent)
        if (ids := _stat_ids(pid)) is not None and ids[0] == parent
    }
    return min(children, key=lambda pid: (children[pid], pid)) if children else None


def _wrapped_shell(bwrap: int) -> int | None:
    init = _first_child(bwrap)
    return _first_child(init) if init is not None else None


def _is_marked(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def _marked_processes(sandbox_id: str) -> list[int]:
    """The processes whose environment carries `sandbox_id`'s marker."""
    marker = f"{SANDBOX_MARKER}={sandbox_id}".encode()
    return [pid for pid in _pids() if _is_marked(pid, marker)]


def _signal_marked(sandbox_id: str, signum: signal.Signals) -> None:
    for pid in _marked_processes(sandbox_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


async def _read_capped(stream: asyncio.StreamReader, max_bytes: int) -> tuple[bytes, bool]:
    """At most `max_bytes` of `stream`, and whether there was more."""
    output = b""
    while len(output) <= max_bytes and (data := await stream.read(_READ_SIZE)):
        output += data
    return output[:max_bytes], len(output) > max_bytes


async def _run_to_end(launch: _Launch, seconds: float, max_output_bytes: int) -> OneShotResult:
    """Run a launch to its end (or `seconds`), keeping at most `max_output_bytes` of stdout;
    whatever it started is killed with it."""
    process = await launch.start(asyncio.subprocess.DEVNULL, asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(seconds):
            output, truncated = await _read_capped(process.stdout, max_output_bytes)
            if not truncated:
                return OneShotResult(exit_code=await process.wait(), output=output)
        return OneShotResult(exit_code=-1, output=output, truncated=True)
    except TimeoutError:
        return OneShotResult(exit_code=-1, output=b"")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


class LocalSandbox(HostWorkspaceSandbox):
    backend: ClassVar[str] = "local"

    def __init__(
        self,
        conversation_id: str,
        workspace_root: Path,
        shell_limits: ShellLimits,
        confinement: LocalConfinement,
        clone_seconds: float,
    ) -> None:
        self._workspace, self._home = conversation_directories(workspace_root, conversation_id)
        self._confinement = confinement
        self._clone_seconds = clone_seconds
        self._cgroup: SandboxCgroup | None = None
        self._disk = DiskGauge(self._workspace)
        self.sandbox_id = f"local-{conversation_id}"
        self.workspace = str(self._workspace)
        self.files = HostWorkspace(self._workspace, self.workspace, confinement.user)
        self.shell = PersistentShell(self._spawn_shell, shell_limits, self.workspace)

    async def _sandbox_cgroup(self) -> SandboxCgroup | None:
        """The cgroup the shell and every program of the sandbox share (made on first use)."""
        if self._cgroup is None:
            self._cgroup = await asyncio.to_thread(
                SandboxCgroup.create, self.sandbox_id, self._confinement.resources
            )
        return self._cgroup

    def _launch(
        self,
        program: list[str],
        extra_environment: dict[str, str],
        cgroup: SandboxCgroup | None,
        network: NetworkMode,
    ) -> _Launch:
        """`program` confined as the shell is: under bwrap (when the runner has it) with the
        workspace, home and toolbox bound, as the sandbox user, in `cgroup`, marked as this
        sandbox's, with the sandbox's environment plus `extra_environment`."""
        confinement = self._confinement
        environment = sandbox_environment(str(self._home))
        environment["PATH"] = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        if confinement.toolbox is not None:
            in_sandbox = bubblewrap.TOOLBOX if confinement.bubblewrap else str(confinement.toolbox)
            environment["PYTHONPATH"] = in_sandbox
        environment.update(extra_environment)
        environment[SANDBOX_MARKER] = self.sandbox_id
        staged = confinement.user is not None
        stage: tuple[Path, ...] | None = None
        if staged:
            toolbox = () if confinement.toolbox is None else (confinement.toolbox,)
            stage = (self._workspace, self._home, *toolbox)
        setup = bubblewrap.ChildSetup(
            user=confinement.user,
            cgroup=cgroup,
            max_file_bytes=confinement.max_file_bytes,
            # The cgroup's limit, where there is one, also holds children and tmpfs.
            memory_bytes=confinement.resources.memory_mb * 1024 * 1024 if cgroup is None else None,
            stage=stage,
        )
        if not confinement.bubblewrap:
            return _Launch(argv=program, cwd=self._workspace, environment=environment, setup=setup)
        argv = bubblewrap.command(
            self._workspace, self._home, network, staged, program, confinement.toolbox
        )
        return _Launch(argv=argv, cwd=Path("/"), environment=environment, setup=setup)

    async def _spawn_shell(self) -> ShellProcess:
        carrier = secrets_carrier(await self._sandbox_secrets())
        launch = self._launch(
            _SHELL, carrier, await self._sandbox_cgroup(), self._confinement.resources.network
        )
        return await LocalShellProcess.spawn(launch, wrapped=self._confinement.bubblewrap)

    async def spawn_process(self, argv: list[str], environment: dict[str, str]) -> SandboxProcess:
        launch = self._launch(
            argv, environment, await self._sandbox_cgroup(), self._confinement.resources.network
        )
        try:
            process = await launch.start(asyncio.subprocess.PIPE, asyncio.subprocess.PIPE)
        except OSError as error:  # unsandboxed, the program itself is exec'd here
            raise ActionError("process_failed", f"{argv[0]}: {error.strerror}") from None
        return LocalProgram(process)

    async def run_once(
        self, argv: list[str], *, seconds: float, max_output_bytes: int
    ) -> OneShotResult:
        """A one-shot bwrap confined as the shell, but with no network and a cgroup of its own,
        so it runs whether the sandbox is live or given back and never stays behind."""
        if not await asyncio.to_thread(self._workspace.is_dir):
            raise ActionError("file_not_found", "the workspace is gone")
        await asyncio.to_thread(self._home.mkdir, parents=True, exist_ok=True)
        cgroup = await asyncio.to_thread(
            SandboxCgroup.create,
            f"{self.sandbox_id}-once-{secrets.token_hex(4)}",
            self._confinement.resources,
        )
        try:
            return await _run_to_end(
                self._launch(argv, {}, cgroup, NetworkMode.NONE), seconds, max_output_bytes
            )
        finally:
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)

    async def usage(self) -> Usage:
        """From the sandbox's cgroup where it has one, else summed over its marked processes;
        and the workspace's size."""

        def measure() -> Usage:
            cgroup = self._cgroup
            figures = (
                read_cgroup(cgroup.directories)
                if cgroup is not None
                else read_processes(_marked_processes(self.sandbox_id))
            )
            return msgspec.structs.replace(figures, disk_bytes=self._disk.bytes())

        return await asyncio.to_thread(measure)

    async def start(self, repository_url: str | None, branch: str | None) -> None:
        await self._prepare_workspace(self._home, repository_url, branch, self._clone_seconds)
        await self.shell.start()

    async def reattach(self) -> bool:
        """Take over this conversation's workspace after a runner restart: kill what the dead
        runner's shell left running; the next command starts a new shell. False when the
        workspace is gone."""

        def take_over() -> bool:
            if not self._workspace.is_dir():
                return False
            self._home.mkdir(parents=True, exist_ok=True)
            _signal_marked(self.sandbox_id, signal.SIGKILL)
            return True

        return await asyncio.to_thread(take_over)

    async def pause(self) -> None:
        await self._signal_all(signal.SIGSTOP)

    async def resume(self) -> None:
        await self._signal_all(signal.SIGCONT)

    async def close(self) -> None:
        """End every process of the sandbox. Under bubblewrap with a cgroup, emptying the
        cgroup does: no process in bwrap's namespaces can move itself out of it, so the scan of
        every process' environment for the marker (the runner's main cost per task on a busy
        host) is needed only where one could (no bubblewrap), or where there is no cgroup."""
        await self.shell.close()
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is None or not self._confinement.bubblewrap:
            await asyncio.to_thread(_signal_marked, self.sandbox_id, signal.SIGKILL)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.remove)

    async def _signal_all(self, signum: signal.Signals) -> None:
        """The shell's group (a command may have dropped the marker) and every marked process."""
        await self.shell.signal(signum)
        await asyncio.to_thread(_signal_marked, self.sandbox_id, signum)
