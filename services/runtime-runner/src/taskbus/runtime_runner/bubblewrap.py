"""How a local sandbox runs under bubblewrap: the `bwrap` command line and the steps between
fork and exec that put the process in its cgroup and make it an unprivileged user.

The sandbox sees the host's system directories read-only (/usr, /etc and the /bin, /lib links),
its own /proc, /dev, /tmp and nothing else of the host: no data dir, no other workspace, no
/home, /root or /run, with /etc/shadow and /etc/gshadow masked. Its workspace and home are bound
at their host paths, writable. It gets user, pid, ipc, uts and mount namespaces, and a network
namespace of its own (no network) unless its policy allows the network.

A runner running as root must not hand root to the sandbox: `bwrap --unshare-user` by real
root maps uid 0 to uid 0, which reads every root-owned file. So the child drops to the
unprivileged `sandbox_uid` before exec'ing bwrap, which then builds its namespaces as an
ordinary user. That user may not be able to walk to the workspace (under /root, or a 0700
directory), so first, still root, the child gives itself a private mount namespace in which the
workspace and home are bound under a fresh /tmp, where bwrap finds them.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner.cgroups import SandboxCgroup

BWRAP = "bwrap"
INSTALL_HINT = "apt-get install bubblewrap"
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_MASKED = ("/etc/shadow", "/etc/gshadow")
# Where the child stages the workspace and home for bwrap, in its private mount namespace.
_STAGE = "/tmp"
_STAGED_WORKSPACE = f"{_STAGE}/workspace"
_STAGED_HOME = f"{_STAGE}/home"
_STAGED_TOOLBOX = f"{_STAGE}/toolbox"
# Where the operator's toolbox (`sandbox_toolbox`: e.g. the mcp SDK) is seen, read-only.
TOOLBOX = "/opt/taskbus/python"

_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _system_directories() -> list[str]:
    arguments = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for path in _SYSTEM_LINKS:
        if os.path.islink(path):
            arguments += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            arguments += ["--ro-bind", path, path]
    for path in _MASKED:
        if os.path.exists(path):
            arguments += ["--ro-bind", "/dev/null", path]
    return arguments


def command(
    workspace: Path,
    home: Path,
    network: NetworkMode,
    staged: bool,
    program: list[str],
    toolbox: Path | None = None,
) -> list[str]:
    """`bwrap` running `program` in the workspace; `staged`: the sources are the child's stage;
    `toolbox`: a host directory seen read-only at TOOLBOX."""
    workspace_source, home_source = (
        (_STAGED_WORKSPACE, _STAGED_HOME) if staged else (str(workspace), str(home))
    )
    tools: list[str] = []
    if toolbox is not None:
        tools = ["--ro-bind", _STAGED_TOOLBOX if staged else str(toolbox), TOOLBOX]
    namespaces = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    if network == NetworkMode.NONE:
        namespaces.append("--unshare-net")
    return [
        BWRAP,
        *namespaces,
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--hostname",
        "sandbox",
        *_system_directories(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/var/tmp",
        "--bind",
        workspace_source,
        str(workspace),
        "--bind",
        home_source,
        str(home),
        *tools,
        "--chdir",
        str(workspace),
        "--",
        *program,
    ]


class ChildSetup:
    """What runs in the child between fork and exec (so: no asyncio, no locks, no logging)."""

    def __init__(
        self,
        *,
        user: tuple[int, int] | None,
        cgroup: SandboxCgroup | None,
        max_file_bytes: int,
        memory_bytes: int | None,
        stage: tuple[Path, ...] | None,
    ) -> None:
        self.user = user
        self.cgroup = cgroup
        self.max_file_bytes = max_file_bytes
        self.memory_bytes = memory_bytes
        # The workspace, home and toolbox (if any), bound under the stage for bwrap (root
        # runners only).
        self.stage = stage

    def __call__(self) -> None:
        if self.cgroup is not None:
            self.cgroup.join()
        if self.stage is not None:
            _stage(self.stage)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_bytes, self.max_file_bytes))
        if self.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        if self.user is not None:
            uid, gid = self.user
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # After the uid change, which clears it: die with the runner instead of lingering.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _stage(sources: tuple[Path, ...]) -> None:
    """A private mount namespace with the workspace, home and toolbox bound under a fresh /tmp."""
    _check(_libc.unshare(_CLONE_NEWNS), "unshare")
    _mount("none", "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing here reaches the host
    # Opened in the new namespace (a bind's source must be one of its mounts), before the
    # tmpfs may cover them.
    fds = [os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for path in sources]
    _mount("tmpfs", _STAGE, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    for fd, target in zip(fds, (_STAGED_WORKSPACE, _STAGED_HOME, _STAGED_TOOLBOX), strict=False):
        os.mkdir(target)
        _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND, None)
        os.close(fd)


def probe(user: tuple[int, int] | None) -> str | None:
    """Why bubblewrap cannot run a sandbox here (None when it can), tried for real once;
    `user` is the uid and gid a root runner drops to (None: the runner's own)."""
    if shutil.which(BWRAP) is None:
        return f"{BWRAP} is not installed"
    with tempfile.TemporaryDirectory(prefix="taskbus-bwrap-probe-") as directory:
        workspace, home = Path(directory) / "workspace", Path(directory) / "home"
        for path in (workspace, home):
            path.mkdir()
            if user is not None:
                os.chown(path, *user)
        setup = ChildSetup(
            user=user,
            cgroup=None,
            max_file_bytes=1 << 20,
            memory_bytes=None,
            stage=(workspace, home) if user is not None else None,
        )
        argv = command(workspace, home, NetworkMode.NONE, user is not None, ["true"])
        return _run_probe(argv, setup)


def _run_probe(argv: list[str], setup: Callable[[], None]) -> str | None:
    try:
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            preexec_fn=setup,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"{BWRAP} failed: {error}"
    if completed.returncode != 0:
        return f"{BWRAP} failed: {completed.stderr.decode(errors='replace').strip()}"
    return None
