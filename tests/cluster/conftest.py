"""A 3-node NATS JetStream cluster in containers (testcontainers), for partition tests.

The nodes run the wheel's own nats-server (`nats_image.ensure_nats_image`: a local
`docker import`, nothing is pulled) on a user-defined docker network, routed to one another
by name, each with its client and monitoring ports published on fixed host ports: a node cut
off with `docker network disconnect` loses its routes and its clients, and gets both back, on
the same ports, when it is reconnected. Ryuk (testcontainers' reaper) would need an image
from a registry, so it is off: the fixture removes its containers and network itself, and
labels them with `taskbus.test_run` so a crashed run's leftovers are recognisable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from taskbus.devtools.nats_image import ensure_nats_image
from taskbus.devtools.nats_server import free_port

testcontainers_config.ryuk_disabled = True

TEST_RUN_LABEL = "taskbus.test_run"
CLIENT_PORT, ROUTE_PORT, MONITOR_PORT = 4222, 6222, 8222
NODES = ("n0", "n1", "n2")


def node_config(name: str) -> str:
    """Pings every second, 3 missed = dead: a cut route or client is noticed in seconds, and a
    stale route does not keep a rejoining node out (the default is 2 minutes). Clients are told
    no container addresses (`no_advertise`): they use the published ports they were given.
    The store is a tmpfs, sized by the machine's memory: the log's 10 GiB limit needs room."""
    routes = ", ".join(f"nats://{node}:{ROUTE_PORT}" for node in NODES)
    return f"""
server_name: {name}
listen: 0.0.0.0:{CLIENT_PORT}
http: 0.0.0.0:{MONITOR_PORT}
ping_interval: "1s"
ping_max: 3
jetstream {{ store_dir: /data, max_file_store: 16GB }}
cluster {{
  name: taskbus, listen: 0.0.0.0:{ROUTE_PORT}, routes: [{routes}]
  no_advertise: true
}}
"""


class Node:
    """One nats-server container; its host ports stay the same across a partition."""

    def __init__(self, name: str, image: str, network: Network, labels: dict[str, str]) -> None:
        self.name = name
        self.network = network
        self.client_port, self.monitor_port = free_port(), free_port()
        self.container = (
            DockerContainer(image, network=network, network_aliases=[name], labels=labels)
            .with_name(f"taskbus-{name}-{labels[TEST_RUN_LABEL]}")
            .with_command("-c /nats.conf")
            .with_copy_into_container(node_config(name).encode(), "/nats.conf")
            .with_bind_ports(CLIENT_PORT, self.client_port)
            .with_bind_ports(MONITOR_PORT, self.monitor_port)
            .with_tmpfs_mount("/data")
            .waiting_for(
                LogMessageWaitStrategy("Server is ready")
                .with_startup_timeout(30)
                .with_poll_interval(0.1)
            )
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def disconnect(self) -> None:
        """`docker network disconnect`: the node loses its routes and its published ports."""
        self._docker_network().disconnect(self.container.get_container_id())

    def reconnect(self) -> None:
        self.network.connect(self.container.get_container_id(), network_aliases=[self.name])

    def events_state(self, stream: str) -> dict[str, Any]:
        """This node's own view of `stream` (`/jsz`), not the leader's answer for it."""
        answer = httpx.get(
            f"http://127.0.0.1:{self.monitor_port}/jsz", params={"streams": "true"}, timeout=5
        ).json()
        for account in answer.get("account_details", []):
            for detail in account.get("stream_detail", []):
                if detail["name"] == stream:
                    return dict(detail["state"])
        raise LookupError(f"{self.name} has no replica of {stream}")

    def _docker_network(self) -> Any:
        client = self.container.get_docker_client().client
        return client.networks.get(self.network.name)


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[list[Node]]:
    """Three routed JetStream nodes in containers; all removed at the end, whatever happened."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        pytest.skip(f"no Docker engine answers: {error}")
    image = ensure_nats_image(client)
    client.close()
    labels = {TEST_RUN_LABEL: uuid.uuid4().hex[:12]}
    network = Network(docker_network_kw={"labels": labels}).create()
    nodes: list[Node] = []
    try:
        for name in NODES:
            nodes.append(Node(name, image, network, labels))
            nodes[-1].container.start()
        yield nodes
    finally:
        for node in nodes:
            node.container.stop()
        network.remove()
