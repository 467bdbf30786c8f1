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
from typing import BinaryIO

from taskbus.contracts import subjects
from taskbus.runtime_runner import repository
from taskbus.runtime_runner.credentials import Checkout, ConversationSecrets
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
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def conversation_directories(workspace_root: Path, conversation_id: str) -> tuple[Path, Path]:
    """(workspace, home) of a conversation's sandbox on this host, on either backend."""
    subjects.require_conversation_id(conversation_id)  # the id becomes a path: checked first
    root = workspace_root.resolve()
    return root / conversation_id, root / ".home" / conversation_id


def base_commit_file(workspace_root: Path, conversation_id: str) -> Path:
    """Where the runner records the commit a workspace was cloned at: beside the workspaces,
    where no sandbox reaches (git changes and diffs are against it)."""
    subjects.require_conversation_id(conversation_id)
    return workspace_root.resolve() / ".base" / conversation_id


def remove_conversation_directories(workspace_root: Path, conversation_id: str) -> None:
    for directory in conversation_directories(workspace_root, conversation_id):
        shutil.rmtree(directory, ignore_errors=True)
    base_commit_file(workspace_root, conversation_id).unlink(missing_ok=True)


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

    def read_bytes(self, path: str, max_bytes: int = MAX_FILE_ACTION_BYTES) -> bytes:
        with self._locate(path) as (directory, name, _):
            try:
                # O_NONBLOCK: a FIFO planted by the sandbox must not block the runner's open.
                fd = os.open(name, _READ_FLAGS, dir_fd=directory)
            except FileNotFoundError:
                raise ActionError("file_not_found", f"{path} does not exist") from None
            try:
                info = os.fstat(fd)  # before fdopen, which refuses a directory
                if stat.S_ISDIR(info.st_mode):
                    raise ActionError("is_a_directory", f"{path} is a directory")
                if not stat.S_ISREG(info.st_mode):
                    raise ActionError("not_a_regular_file", f"{path} is not a regular file")
            except ActionError:
                os.close(fd)
                raise
            with os.fdopen(fd, "rb") as file:
                data = file.read(max_bytes + 1)  # it may have grown since the fstat
            if info.st_size > max_bytes or len(data) > max_bytes:
                raise ActionError("file_too_large", f"{path} is larger than {max_bytes} bytes")
            return data

    def write_bytes(self, path: str, data: bytes, offset: int = 0) -> None:
        """Write `data` at `offset`; offset 0 creates or truncates the file."""
        with self._locate(path, make_parents=True) as (directory, name, _):
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            if offset == 0:
                flags |= os.O_TRUNC
            try:
                fd = os.open(name, flags, 0o644, dir_fd=directory)
            except IsADirectoryError:
                raise ActionError("is_a_directory", f"{path} is a directory") from None
            with os.fdopen(fd, "wb") as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    raise ActionError("not_a_regular_file", f"{path} is not a regular file")
                if self.owner is not None:
                    os.fchown(file.fileno(), *self.owner)
                if offset:
                    file.seek(offset)
                file.write(data)

    def relative_path(self, path: str) -> str:
        """`path` as a path relative to the workspace, lexically (`..` may not climb out)."""
        return "/".join(self._parts(path))

    def entries(self, path: str, skip: frozenset[str]) -> list[str]:
        """One directory level, hidden entries included, but for the names in `skip`:
        directories (never a link to one) first with a trailing `/`, then the rest."""
        with self._locate(path) as (directory, name, _):
            try:
                top = os.open(name, _DIRECTORY_FLAGS, dir_fd=directory)
            except NotADirectoryError:
                raise ActionError("not_a_directory", f"{path} is not a directory") from None
            try:
                with os.scandir(top) as listing:
                    found = [
                        (entry.name, entry.is_dir(follow_symlinks=False))
                        for entry in listing
                        if entry.name not in skip
                    ]
            finally:
                os.close(top)
        directories = sorted(f"{entry}/" for entry, is_dir in found if is_dir)
        return directories + sorted(entry for entry, is_dir in found if not is_dir)

    def walk(self, skip: frozenset[str]) -> Iterator[WorkspaceEntry]:
        """Every regular file, symbolic link and directory in the workspace, depth first,
        with directories named in `skip` left out. Links are reported, never followed; other
        kinds (FIFOs, sockets, devices) are left out. Each file is opened as it is yielded
        and closed after."""
        top = os.open(self.host_root, _DIRECTORY_FLAGS)
        try:
            yield from _walk(top, "", skip)
        finally:
            os.close(top)

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
    # The user's git token and sandbox secrets for this conversation (the runner's sandbox
    # factory sets them); None: the sandbox has none.
    secrets: ConversationSecrets | None = None

    async def _sandbox_secrets(self) -> dict[str, str]:
        """The secrets the shell exports, read as it starts (so a restarted shell has them)."""
        return {} if self.secrets is None else await self.secrets.environment()

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
            checkout = (
                Checkout(url=repository_url)
                if self.secrets is None
                else await self.secrets.checkout(repository_url)
            )
            await repository.clone(
                checkout.url, branch, workspace, clone_seconds, checkout.credential
            )
            commit = await repository.head_commit(workspace)
            if commit is not None:
                base = base_commit_file(workspace.parent, workspace.name)
                await asyncio.to_thread(_record, base, commit)
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


def _record(base: Path, commit: str) -> None:
    base.parent.mkdir(mode=0o700, exist_ok=True)
    base.write_text(commit)


def _give(directories: list[Path], owner: tuple[int, int], whole_tree: bool) -> None:
    """Give `directories` (and, when `whole_tree`, everything under them) to `owner`."""
    for top in directories:
        os.chown(top, *owner, follow_symlinks=False)
        if whole_tree:
            for current, names, files in os.walk(top):
                for name in [*names, *files]:
                    os.chown(os.path.join(current, name), *owner, follow_symlinks=False)


class WorkspaceEntry:
    """One entry of `HostWorkspace.walk`: `file` is open while it is yielded (regular files);
    `link` is a symbolic link's target."""

    def __init__(
        self, path: str, info: os.stat_result, file: BinaryIO | None = None, link: str = ""
    ) -> None:
        self.path = path
        self.info = info
        self.file = file
        self.link = link


def _walk(directory: int, prefix: str, skip: frozenset[str]) -> Iterator[WorkspaceEntry]:
    with os.scandir(directory) as listing:
        names = sorted(entry.name for entry in listing)
    for name in names:
        path = f"{prefix}{name}"
        try:
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if name in skip:
                    continue
                # O_NOFOLLOW: swapped for a link since the stat, it is not entered.
                child = os.open(name, _DIRECTORY_FLAGS, dir_fd=directory)
                try:
                    yield WorkspaceEntry(f"{path}/", info)
                    yield from _walk(child, f"{path}/", skip)
                finally:
                    os.close(child)
            elif stat.S_ISLNK(info.st_mode):
                yield WorkspaceEntry(path, info, link=os.readlink(name, dir_fd=directory))
            elif stat.S_ISREG(info.st_mode):
                fd = os.open(name, _READ_FLAGS, dir_fd=directory)
                with os.fdopen(fd, "rb") as file:
                    opened = os.fstat(file.fileno())
                    if stat.S_ISREG(opened.st_mode):  # not swapped for a FIFO since the stat
                        yield WorkspaceEntry(path, opened, file)
        except OSError:  # changed by the sandbox while walking (gone, swapped): left out
            continue


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
