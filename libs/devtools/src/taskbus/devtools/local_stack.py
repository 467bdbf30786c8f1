"""The `taskbus up` running on a data dir: its lock, its state file, and its sandboxes.

`<data dir>/up.lock` is held (flock) by the running `up` for as long as it lives and names its
pid: a second `up` on the same data dir refuses before it touches anything (it would otherwise
rewrite the bus credentials and truncate the running server's logs), and the kernel releases the
lock when the holder dies however it dies, so a stale file never blocks a start.
`<data dir>/up.json` says what `status` shows. Docker sandboxes started under this data dir
carry the label `taskbus.up=<data dir digest>`, so `up` can remove exactly its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec

log = logging.getLogger("taskbus.launcher")

LOCK_FILE = "up.lock"
STATE_FILE = "up.json"
SANDBOX_LABEL = "taskbus.up"
REMOVAL_THREADS = 8


class StackRunning(Exception):
    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"taskbus up is already running on {data_dir} ({who}): stop it with `taskbus down`, "
            "or give this one its own TASKBUS_DATA_DIR"
        )
        self.pid = pid


class UpState(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    data_dir: str
    gateway_url: str
    nats_url: str
    # The nonce its gateway echoes in /api/health: a gateway without it is someone else's.
    nonce: str
    ready: bool = False


def sandbox_label(data_dir: Path) -> str:
    """`taskbus.up=<digest>`: the same for every `up` of this data dir, so sandboxes a runner
    re-attached after `--keep-sandboxes` are still found; a digest, since label lists are
    comma-separated and paths may hold commas."""
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return f"{SANDBOX_LABEL}={digest}"


def hold_lock(data_dir: Path) -> int:
    """The locked file descriptor (kept open while `up` runs), or StackRunning."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StackRunning(data_dir, running_pid(data_dir)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def running_pid(data_dir: Path) -> int | None:
    """The pid of the `up` holding this data dir's lock; None when none holds it."""
    path = data_dir / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = path.read_text().strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def write_state(data_dir: Path, state: UpState) -> None:
    """Atomically, so `status` never reads half a file."""
    path = data_dir / STATE_FILE
    partial = path.with_suffix(".tmp")
    partial.write_bytes(msgspec.json.encode(state))
    partial.replace(path)


def read_state(data_dir: Path) -> UpState | None:
    with contextlib.suppress(FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return msgspec.json.decode((data_dir / STATE_FILE).read_bytes(), type=UpState)
    return None


def stop_running(data_dir: Path, timeout: float) -> int | None:
    """SIGTERM the `up` running on `data_dir` (it stops its children, then exits) and wait until
    its lock is free; its pid, or None when nothing ran. TimeoutError if it outlives `timeout`."""
    pid = running_pid(data_dir)
    if pid is None:
        return None
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(data_dir) is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"taskbus up (pid {pid}) still runs after {timeout:.0f} s")
        time.sleep(0.1)
    return pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_sandboxes(label: str) -> int:
    """Remove every docker container carrying `label` (running, paused or stopped); how many.
    No docker engine means no docker sandboxes: 0."""
    # Imported here: only `up`'s shutdown needs it, and every other CLI command would pay for it.
    import docker
    from docker.errors import DockerException
    from docker.models.containers import Container

    try:
        engine = docker.from_env(timeout=30)
    except DockerException:
        return 0

    def remove(container: Container) -> bool:
        try:
            container.remove(force=True)
        except DockerException:
            return False
        return True

    try:
        containers = engine.containers.list(all=True, filters={"label": label})
        # Several at once: a test run's stack can leave dozens, each removal ~100 ms.
        with ThreadPoolExecutor(REMOVAL_THREADS) as pool:
            return sum(pool.map(remove, containers))
    except DockerException as error:
        log.warning("could not list sandboxes labelled %s: %s", label, error)
        return 0
    finally:
        engine.close()
