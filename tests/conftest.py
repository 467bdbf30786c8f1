"""The whole stack as processes (`taskbus up` in a temp data dir), driven through its public API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from taskbus.contracts.bus import BusCredential, read_credential
from taskbus.devtools.bus_auth import credential_file
from taskbus.devtools.launcher import local_api_key
from taskbus.devtools.nats_server import free_port


class Stack(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    ws_url: str
    nats_url: str
    api_key: str
    data_dir: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, key: str | None = None, **options: Any) -> httpx.AsyncClient:
        """An API client of the local user, or of the user `key` is; `options` are httpx's
        (a 60 s timeout unless given)."""
        headers = self.headers if key is None else {"Authorization": f"Bearer {key}"}
        options.setdefault("timeout", 60)
        return httpx.AsyncClient(base_url=self.url, headers=headers, **options)

    def bus_credential(self, user: str) -> BusCredential:
        """The NATS credential `taskbus up` gave `user` (a service, or "admin")."""
        return read_credential(credential_file(self.data_dir / "bus", user))


def _local_api_key(data_dir: Path) -> str:
    key = local_api_key(data_dir / "api_keys")
    assert key is not None, "the launcher wrote no local API key"
    return key


# Stacks sample resource usage less often than any test lasts, unless a test asks otherwise
# (tests/test_resource_usage.py): tests that count a conversation's events, or compare the log
# before and after a request that must append nothing, see no sample land in between.
QUIET_USAGE_SECONDS = "3600"
READ_WAIT_MS = "15000"
REQUEST_TIMEOUT_SECONDS = "20"


@contextlib.contextmanager
def running_stack(
    data_dir: Path, script: dict[str, Any] | None = None, **settings: str
) -> Iterator[Stack]:
    """`taskbus up` in `data_dir`, with extra `TASKBUS_*` settings, until the block ends;
    `script` is what the scripted model plays instead of its packaged demo."""
    if script is not None:
        script_file = data_dir / "script.json"
        script_file.write_text(json.dumps(script))
        settings["TASKBUS_SCRIPTED_MODEL_SCRIPT"] = str(script_file)
    port, nats_port = free_port(), free_port()
    env = dict(
        os.environ,
        TASKBUS_DATA_DIR=str(data_dir),
        TASKBUS_PORT=str(port),
        TASKBUS_NATS_PORT=str(nats_port),
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        # A throwaway stack: its sandboxes go with it.
        TASKBUS_RUNNER_ID=f"e2e-{port}",
        TASKBUS_REMOVE_SANDBOXES_ON_SHUTDOWN="true",
        # `up` writes the CLI's config there: never over the developer's own.
        XDG_CONFIG_HOME=str(data_dir / "config"),
    )
    env.pop("TASKBUS_LLM_MODEL", None)
    env["TASKBUS_USAGE_INTERVAL_SECONDS"] = QUIET_USAGE_SECONDS
    # Two stacks share two cores in a test run, and an ingest can then lag its log by more
    # than the 4 s a read waits at the event store's barrier by default: a read waits longer
    # here (and the gateway's requests with it) rather than answer a retryable 503.
    env["TASKBUS_READ_WAIT_MS"] = READ_WAIT_MS
    env["TASKBUS_REQUEST_TIMEOUT_SECONDS"] = REQUEST_TIMEOUT_SECONDS
    env.update(settings)
    launcher_log = data_dir / "launcher.log"
    log = launcher_log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "taskbus.devtools.cli", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        # The launcher prints its banner once every service pulls from its consumer.
        while "Taskbus is up." not in launcher_log.read_text(errors="replace"):
            if process.poll() is not None:
                raise AssertionError(f"taskbus up exited early:\n{launcher_log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("stack did not come up within 120 s")
            time.sleep(0.25)
        yield Stack(
            url=f"http://127.0.0.1:{port}",
            ws_url=f"ws://127.0.0.1:{port}",
            nats_url=f"nats://127.0.0.1:{nats_port}",
            api_key=_local_api_key(data_dir),
            data_dir=data_dir,
        )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


# A second user of the session stack, for the tests where one user attacks another's data.
MALLORY_KEY = "tb_mallory_session_stack_key"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack with default settings, shared by every module that does not need its own."""
    with running_stack(
        tmp_path_factory.mktemp("stack"), TASKBUS_API_KEYS=f"{MALLORY_KEY}=mallory"
    ) as running:
        yield running


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The local user's client on whichever `stack` the test module runs (modules override it)."""
    async with stack.client() as client:
        yield client


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scale-out file first: the longest one, it would otherwise run on one worker alone at
    the end of a parallel run (`--dist loadfile` hands files out in collection order)."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/scale/"))
