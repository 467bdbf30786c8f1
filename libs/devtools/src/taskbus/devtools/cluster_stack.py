"""Taskbus scaled out on one machine: a 3-node NATS cluster and several of each service.

For the scale-out acceptance test (tests/scale) and bench/scale.py. The nodes are nats-server
processes routed to one another on loopback, with the bus users and permissions of `taskbus
up` (`bus_auth`); the streams and buckets get a replica on each node. Then the scripted model,
one event-store, N session-managers (`TASKBUS_INSTANCE_ID` sm0, sm1, …), M runners
(`TASKBUS_RUNNER_ID` runner0, …, each with its own workspace root, local backend under
bubblewrap) and K gateways (each its own port), every one a real `python -m taskbus.<service>`
connected to a node of its own (round-robin; nats-py learns the others from the cluster).

Unlike `taskbus up`, nothing is restarted behind the caller's back: a test kills a process by
name (`kill`, SIGKILL) and decides whether it comes back (`restart`). Each process logs to
`<data dir>/logs/<name>.log`. `create_conversations` submits work through the gateways' REST
API in turn, and `StoredEvents` reads back what the cluster stored, as the bus admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.bus import CREDENTIALS_FILE_ENV, BusCredential, connect
from taskbus.contracts.events import (
    AnyEvent,
    ConversationStatusChanged,
    UnknownEvent,
    decode_event,
)
from taskbus.contracts.partitions import PARTITIONS
from taskbus.contracts.secret_box import ensure_key_file
from taskbus.contracts.status import ENDED_STATUSES, ConversationStatus
from taskbus.contracts.streams import ensure_streams, stream_limits_from_env
from taskbus.devtools import bus_auth
from taskbus.devtools.launcher import (
    ensure_api_key,
    scripted_model_env,
    wait_for_consumers,
    wait_for_gateway,
    wait_for_port,
    wait_for_runner,
    without_secrets_it_does_not_need,
    write_nats_config,
)
from taskbus.devtools.nats_server import NatsServer, die_with_parent, free_port

STARTUP_SECONDS = 180
STOP_GRACE_SECONDS = 10
# Resource samples are not what these runs measure; they would only add events.
QUIET_USAGE_SECONDS = "3600"


class ClusterSettings(msgspec.Struct, frozen=True, kw_only=True):
    # Streams and buckets get a replica on each node (1 or 3).
    nats_nodes: int = 3
    session_managers: int = 3
    runners: int = 1
    gateways: int = 2
    # What the scripted model plays (contracts of scripted_llm.Script).
    script: dict[str, Any]
    # Extra `TASKBUS_*` settings of every service.
    settings: Mapping[str, str] = {}


class ServiceProcess:
    """One service process, started and killed only when asked."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self._args = args
        self._env = env
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._args,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.alive and self._process is not None else None

    def kill(self) -> None:
        """SIGKILL: no graceful stop, no lease given back, no sandbox closed."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class Cluster:
    """A running cluster: its gateways, its NATS nodes and its processes by name."""

    def __init__(self, data_dir: Path, api_key: str, admin: BusCredential) -> None:
        self.data_dir = data_dir
        self.api_key = api_key
        self._admin = admin
        self.nodes: list[NatsServer] = []
        self.processes: dict[str, ServiceProcess] = {}
        self.gateway_urls: list[str] = []
        self.session_managers: list[str] = []
        self.runners: list[str] = []

    @property
    def nats_urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def admin(self) -> Client:
        """A connection as the bus admin (reads everything); it learns the other nodes from
        the first and fails over to them."""
        return await connect(
            self.nats_urls[0], "taskbus-cluster-admin", self._admin, max_reconnect_attempts=-1
        )

    def kill(self, name: str) -> float:
        """kill -9 the process `name`; the monotonic time it died."""
        self.processes[name].kill()
        return time.monotonic()

    def restart(self, name: str) -> None:
        self.processes[name].start()

    def log(self, name: str) -> str:
        return self.processes[name].log_path.read_text(errors="replace")

    async def create_conversations(self, count: int, task: str, at_once: int = 16) -> list[str]:
        """`count` conversations, created through the gateways in turn, `at_once` at a time."""
        limit = asyncio.Semaphore(at_once)
        late = 0

        async def one(api: httpx.AsyncClient, index: int) -> str:
            nonlocal late
            gateway = self.gateway_urls[index % len(self.gateway_urls)]
            async with limit:
                response = await api.post(
                    f"{gateway}/api/conversations", json={"initial_user_msg": task}
                )
            # 504: accepted, but not in the log within the gateway's wait (a loaded machine);
            # it is created all the same, as the log shows later.
            if response.status_code not in (201, 504):
                raise AssertionError(f"create answered {response.status_code}: {response.text}")
            late += response.status_code == 504
            return str(response.json()["conversation_id"])

        async with httpx.AsyncClient(headers=self.headers, timeout=60) as api:
            created = await asyncio.gather(*(one(api, i) for i in range(count)))
        print(f"{count} created, {late} of them visible only after the gateway's wait")
        return list(created)


class StoredEvents:
    """Every event the cluster stores, per conversation in log order, with the time the stream
    stored it (the server's clock), as the bus admin reads them from the start of the log."""

    def __init__(self) -> None:
        self.events: dict[str, list[AnyEvent | UnknownEvent]] = defaultdict(list)
        self.stored_at: dict[str, list[datetime]] = defaultdict(list)

    async def follow(self, nc: Client) -> None:
        await nc.jetstream().subscribe(subjects.ALL_EVENTS, cb=self._add, ordered_consumer=True)

    async def _add(self, message: Msg) -> None:
        event = decode_event(message.data)
        self.events[event.conversation_id].append(event)
        self.stored_at[event.conversation_id].append(message.metadata.timestamp)

    def status(self, conversation_id: str) -> ConversationStatus | None:
        changes = [
            e for e in self.events[conversation_id] if isinstance(e, ConversationStatusChanged)
        ]
        return changes[-1].status if changes else None

    def ended(self, conversation_id: str) -> bool:
        return self.status(conversation_id) in ENDED_STATUSES

    async def until_ended(self, conversation_ids: list[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not all(self.ended(c) for c in conversation_ids):
            if time.monotonic() > deadline:
                left = [c for c in conversation_ids if not self.ended(c)]
                raise AssertionError(f"{len(left)} conversations not ended in {seconds} s")
            await asyncio.sleep(0.1)


def _node_args(index: int, route_ports: list[int]) -> list[str]:
    """Cluster options of node `index`: routes to every other node on loopback (none for one
    node: a lone server is no cluster)."""
    if len(route_ports) == 1:
        return []
    routes = ",".join(
        f"nats://127.0.0.1:{port}" for i, port in enumerate(route_ports) if i != index
    )
    return [
        "--server_name",
        f"n{index}",
        "--cluster_name",
        "taskbus",
        "--cluster",
        f"nats://127.0.0.1:{route_ports[index]}",
        "--routes",
        routes,
    ]


async def _create_streams(nc: Client, replicas: int) -> None:
    """Once the nodes have elected a JetStream meta leader (the servers are "ready" before)."""
    while True:
        try:
            await ensure_streams(nc.jetstream(), replicas, stream_limits_from_env())
            return
        except (nats.errors.Error, TimeoutError):
            await asyncio.sleep(0.5)


async def wait_for_partitions(nc: Client, instances: list[str]) -> dict[int, str]:
    """Until every session-manager partition is leased to one of `instances`, each holding
    some; the partition -> holder map."""
    kv = await nc.jetstream().key_value(subjects.PARTITIONS_BUCKET)
    holders: dict[int, str] = {}
    while True:
        with contextlib.suppress(TimeoutError):  # a busy cluster answers late: ask again
            holders = await partition_holders(kv)
        if len(holders) == PARTITIONS and set(holders.values()) == set(instances):
            return holders
        await asyncio.sleep(0.1)


async def partition_holders(kv: KeyValue) -> dict[int, str]:
    """Partition -> the session-manager instance holding its lease now."""
    holders: dict[int, str] = {}
    for partition in range(PARTITIONS):
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(f"{subjects.SESSION_MANAGER}.p{partition}")
            if entry.value:
                holders[partition] = entry.value.decode()
    return holders


@contextlib.asynccontextmanager
async def running_cluster(data_dir: Path, settings: ClusterSettings) -> AsyncIterator[Cluster]:
    """The cluster of `settings` in `data_dir`, ready (every gateway healthy, every durable
    pulled, every partition leased, every runner registered), until the block ends."""
    started = time.time()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bus = data_dir / "bus"
    credentials = bus_auth.new_credentials(bus)
    write_nats_config(bus / "nats.conf", credentials)
    cluster = Cluster(data_dir, ensure_api_key(data_dir / "api_keys"), credentials[bus_auth.ADMIN])
    route_ports = [free_port() for _ in range(settings.nats_nodes)]
    try:
        for index in range(settings.nats_nodes):
            node = NatsServer(
                data_dir / "nats" / f"n{index}",
                config_file=bus / "nats.conf",
                extra_args=_node_args(index, route_ports),
            )
            cluster.nodes.append(node)
            node.start()
        nc = await cluster.admin()
        try:
            async with asyncio.timeout(STARTUP_SECONDS):
                await _create_streams(nc, settings.nats_nodes)
                await _start_services(cluster, settings, bus, logs)
                js = nc.jetstream()
                for url in cluster.gateway_urls:
                    await wait_for_gateway(url)
                await wait_for_consumers(js)
                for runner in cluster.runners:
                    await wait_for_runner(js, runner, started)
                await wait_for_partitions(nc, cluster.session_managers)
        finally:
            await nc.close()
        yield cluster
    finally:
        for process in reversed(cluster.processes.values()):
            process.stop()
        for node in cluster.nodes:
            node.stop()


async def _start_services(
    cluster: Cluster, settings: ClusterSettings, bus: Path, logs: Path
) -> None:
    data_dir = cluster.data_dir
    script_file = data_dir / "script.json"
    script_file.write_text(json.dumps(settings.script))
    model_port = free_port()
    base = dict(os.environ)
    base.pop(CREDENTIALS_FILE_ENV, None)
    base.pop("TASKBUS_LLM_MODEL", None)
    base.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        TASKBUS_STREAM_REPLICAS=str(settings.nats_nodes),
        TASKBUS_API_KEYS_FILE=str(data_dir / "api_keys"),
        TASKBUS_CLICKHOUSE_DSN=f"chdb://{data_dir / 'clickhouse'}",
        TASKBUS_SECRETS_KEY_FILE=str(ensure_key_file(data_dir / "secrets.key")),
        TASKBUS_BACKEND="local",
        TASKBUS_REMOVE_SANDBOXES_ON_SHUTDOWN="true",
        TASKBUS_USAGE_INTERVAL_SECONDS=QUIET_USAGE_SECONDS,
        **scripted_model_env(f"http://127.0.0.1:{model_port}/v1"),
    )
    base.update(settings.settings)

    def add(name: str, args: list[str], env: dict[str, str]) -> None:
        process = ServiceProcess(name, [sys.executable, *args], env, logs / f"{name}.log")
        cluster.processes[name] = process
        process.start()

    model_args = ["--port", str(model_port), "--script", str(script_file)]
    add("scripted-llm", ["-m", "taskbus.devtools.scripted_llm", *model_args], base)
    await wait_for_port(model_port)

    urls = cluster.nats_urls
    nth = 0

    def service(name: str, service: str, **extra: str) -> None:
        nonlocal nth
        env = {
            **without_secrets_it_does_not_need(base, service),
            CREDENTIALS_FILE_ENV: str(bus_auth.credential_file(bus, service)),
            "TASKBUS_NATS_URL": urls[nth % len(urls)],
            **extra,
        }
        nth += 1
        add(name, ["-m", f"taskbus.{service}"], env)

    service("event-store", subjects.EVENT_STORE)
    for index in range(settings.session_managers):
        name = f"sm{index}"
        cluster.session_managers.append(name)
        service(name, subjects.SESSION_MANAGER, TASKBUS_INSTANCE_ID=name)
    for index in range(settings.runners):
        name = f"runner{index}"
        cluster.runners.append(name)
        workspaces = data_dir / "workspaces" / name
        service(
            name,
            subjects.RUNTIME_RUNNER,
            TASKBUS_RUNNER_ID=name,
            TASKBUS_WORKSPACE_ROOT=str(workspaces),
        )
    for index in range(settings.gateways):
        port = free_port()
        cluster.gateway_urls.append(f"http://127.0.0.1:{port}")
        service(f"gateway{index}", subjects.GATEWAY, TASKBUS_PORT=str(port))


def cpu_seconds(pid: int | None) -> float:
    """CPU time a process has used (user + system, with the children it has waited for: a
    runner's sandbox commands), from /proc; 0 for none."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")
