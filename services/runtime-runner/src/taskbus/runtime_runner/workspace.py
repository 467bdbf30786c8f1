"""A sandbox's workspace directory on this host, for the runner's own file actions.

Sandboxed processes can change the workspace while the runner reads or writes it, so paths are
never handed to the kernel whole: every component is opened relative to the already opened
directory before it, with `O_NOFOLLOW`, and symbolic links are followed here, by hand, as the
sandbox sees them. An absolute link target is read in the sandbox's view (`visible_root`, e.g.
`/workspace` inside a container whose workspace is a bind mount of `host_root`), so a link can
never lead the runner, which may be root on the host, to a host file outside the workspace. `..`
is resolved lexically before the walk and may not climb above the workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shutil
import stat
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from taskbus.contracts import subjects
from taskbus.runtime_runner import repository
from taskbus.runtime_runner.sandbox import (
    ActionError,
    CommandOutcome,
    CommandRequest,
    OutputSink,
    Sandbox,
)
from taskbus.runtime_runner.shell import PersistentShell

# Files larger than this are not loaded into the runner (the agent can still use the shell).
MAX_FILE_ACTION_BYTES = 32 * 1024 * 1024
_MAX_SYMLINK_HOPS = 40
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def conversation_directories(workspace_root: Path, conversation_id: str) -> tuple[Path, Path]:
    """(workspace, home) of a conversation's sandbox on this host, on either backend."""
    subjects.require_conversation_id(conversation_id)  # the id becomes a path: checked first
    root = workspace_root.resolve()
    return root / conversation_id, root / ".home" / conversation_id


def remove_conversation_directories(workspace_root: Path, conversation_id: str) -> None:
    for directory in conversation_directories(workspace_root, conversation_id):
        shutil.rmtree(directory, ignore_errors=True)


class HostWorkspace:
    def __init__(
        self, host_root: Path, visible_root: str, owner: tuple[int, int] | None = None
    ) -> None:
        self.host_root = host_root
        self.visible_root = visible_root
        # The (uid, gid) sandboxed processes run as, when not the runner's: what the runner
        # creates is given to them, or they could not change the files it writes.
        self.owner = owner

    def _parts(self, path: str) -> list[str]:
        """`path` (relative to the workspace, or absolute in the sandbox's view) as components."""
        absolute = posixpath.normpath(posixpath.join(self.visible_root, path))
        if absolute != self.visible_root and not absolute.startswith(self.visible_root + "/"):
            raise ActionError(
                "path_outside_workspace", f"{path} is outside the workspace {self.visible_root}"
            )
        relative = absolute[len(self.visible_root) :]
        return [part for part in relative.split("/") if part]

    @contextlib.contextmanager
    def _locate(self, path: str, make_parents: bool = False) -> Iterator[tuple[int, str, str]]:
        """(fd of the directory holding the target, the target's name there, its canonical
        visible path). The target itself is not a symlink, or does not exist yet."""
        pending = deque(self._parts(path))
        resolved: list[str] = []
        directories = [os.open(self.host_root, _DIRECTORY_FLAGS)]
        hops = 0
        try:
            while pending:
                name = pending.popleft()
                try:
                    info = os.stat(name, dir_fd=directories[-1], follow_symlinks=False)
                except FileNotFoundError:
                    if not pending:
                        yield directories[-1], name, self._visible([*resolved, name])
                        return
                    if not make_parents:
                        raise ActionError("file_not_found", f"{path} does not exist") from None
                    os.mkdir(name, dir_fd=directories[-1])
                    if self.owner is not None:
                        os.chown(name, *self.owner, dir_fd=directories[-1], follow_symlinks=False)
                    info = os.stat(name, dir_fd=directories[-1], follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    hops += 1
                    if hops > _MAX_SYMLINK_HOPS:
                        raise ActionError("too_many_symlinks", f"{path}: too many symbolic links")
                    target = os.readlink(name, dir_fd=directories[-1])
                    base = posixpath.join(self.visible_root, *resolved)
                    rest = posixpath.join(target, *pending) if pending else target
                    # Restart from the root with the link replaced by its target.
                    pending = deque(self._parts(posixpath.join(base, rest)))
                    resolved = []
                    for fd in directories[1:]:
                        os.close(fd)
                    del directories[1:]
                    continue
                if not pending:
                    yield directories[-1], name, self._visible([*resolved, name])
                    return
                if not stat.S_ISDIR(info.st_mode):
                    raise ActionError("file_not_found", f"{path}: {name} is not a directory")
                directories.append(os.open(name, _DIRECTORY_FLAGS, dir_fd=directories[-1]))
                resolved.append(name)
            yield directories[-1], ".", self._visible(resolved)
        finally:
            for fd in directories:
                os.close(fd)

    def _visible(self, parts: list[str]) -> str:
        return posixpath.join(self.visible_root, *parts)

    def resolve(self, path: str) -> str:
        with self._locate(path) as (_, _, visible):
            return visible

    def read_bytes(self, path: str) -> bytes:
        with self._locate(path) as (directory, name, _):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            except FileNotFoundError:
                raise ActionError("file_not_found", f"{path} does not exist") from None
            with os.fdopen(fd, "rb") as file:
                info = os.fstat(file.fileno())
                if stat.S_ISDIR(info.st_mode):
                    raise ActionError("is_a_directory", f"{path} is a directory")
                if info.st_size > MAX_FILE_ACTION_BYTES:
                    raise ActionError(
                        "file_too_large", f"{path} is larger than {MAX_FILE_ACTION_BYTES} bytes"
                    )
                return file.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        with self._locate(path, make_parents=True) as (directory, name, _):
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, 0o644, dir_fd=directory)
            except IsADirectoryError:
                raise ActionError("is_a_directory", f"{path} is a directory") from None
            with os.fdopen(fd, "wb") as file:
                if self.owner is not None:
                    os.fchown(file.fileno(), *self.owner)
                file.write(data)

    def exists(self, path: str) -> bool:
        try:
            with self._locate(path) as (directory, name, _):
                return _stat(name, directory) is not None
        except ActionError as error:
            if error.code == "file_not_found":
                return False
            raise

    def is_dir(self, path: str) -> bool:
        try:
            with self._locate(path) as (directory, name, _):
                info = _stat(name, directory)
                return info is not None and stat.S_ISDIR(info.st_mode)
        except ActionError as error:
            if error.code == "file_not_found":
                return False
            raise

    def list_tree(self, path: str, depth: int) -> list[str]:
        """Non-hidden entries under a directory, `depth` levels deep, relative to it."""
        with self._locate(path) as (directory, name, _):
            top = os.open(name, _DIRECTORY_FLAGS, dir_fd=directory)
            try:
                return _list_tree(top, depth)
            finally:
                os.close(top)


class HostWorkspaceSandbox(Sandbox):
    """A sandbox whose workspace is a directory on this host (the local directory, or the
    docker backend's bind mount): file actions run in the runner, off the event loop."""

    files: HostWorkspace
    shell: PersistentShell

    async def _prepare_workspace(
        self, home: Path, repository_url: str | None, branch: str | None, clone_seconds: float
    ) -> None:
        """Create the workspace and home directories and clone the repository into the workspace.

        A workspace that already has files is a restarted sandbox's: its clone is already there.
        """
        workspace = self.files.host_root

        def make_directories() -> bool:
            home.mkdir(parents=True, exist_ok=True)
            workspace.mkdir(parents=True, exist_ok=True)
            return any(workspace.iterdir())

        has_files = await asyncio.to_thread(make_directories)
        if repository_url and not has_files:
            await repository.clone(repository_url, branch, workspace, clone_seconds)
        if self.files.owner is not None:
            # Only directories just made and a fresh clone: nothing the sandbox could have
            # planted (a hard link to a host file) is ever chowned.
            owner = self.files.owner
            await asyncio.to_thread(_give, [home, workspace], owner, not has_files)

    async def run_command(self, request: CommandRequest, on_output: OutputSink) -> CommandOutcome:
        return await self.shell.execute(request, on_output)

    def resolve(self, path: str) -> str:
        return self.files.resolve(path)

    async def read_bytes(self, path: str) -> bytes:
        return await asyncio.to_thread(self.files.read_bytes, path)

    async def write_bytes(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(self.files.write_bytes, path, data)

    async def exists(self, path: str) -> bool:
        return await asyncio.to_thread(self.files.exists, path)

    async def is_dir(self, path: str) -> bool:
        return await asyncio.to_thread(self.files.is_dir, path)

    async def list_tree(self, path: str, depth: int) -> list[str]:
        return await asyncio.to_thread(self.files.list_tree, path, depth)


def _give(directories: list[Path], owner: tuple[int, int], whole_tree: bool) -> None:
    """Give `directories` (and, when `whole_tree`, everything under them) to `owner`."""
    for top in directories:
        os.chown(top, *owner, follow_symlinks=False)
        if whole_tree:
            for current, names, files in os.walk(top):
                for name in [*names, *files]:
                    os.chown(os.path.join(current, name), *owner, follow_symlinks=False)


def _stat(name: str, directory: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _list_tree(top: int, depth: int) -> list[str]:
    entries = []
    for current, directories, files, _ in os.fwalk(".", dir_fd=top):
        level = current.count("/")  # "." is the top, "./a" one level below
        directories[:] = sorted(d for d in directories if not d.startswith("."))
        for name in [*directories, *sorted(f for f in files if not f.startswith("."))]:
            relative = posixpath.normpath(posixpath.join(current, name))
            entries.append(f"{relative}/" if name in directories else relative)
        if level + 1 >= depth:
            directories[:] = []
    return sorted(entries)
