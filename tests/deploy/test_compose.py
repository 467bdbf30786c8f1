"""deploy/compose.yaml as Compose itself reads it (`docker compose config`, or Debian's
`docker-compose` 1.29), and what an operator relies on: real settings only, one id per stateful
instance, NATS over TLS with one login per service, no secret in the file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from .manifests import DEPLOY, SECRET_NAME, service_of, taskbus_variables

COMPOSE_FILE = DEPLOY / "compose.yaml"
# What the operator must supply (deploy/.env or the environment); canaries here, so the test
# can see where each one ends up.
OPERATOR_VALUES = {
    "TASKBUS_LLM_MODEL": "openai/canary-model",
    "TASKBUS_LLM_API_KEY": "canary-llm-key-7f3a",
    "TASKBUS_CLICKHOUSE_PASSWORD": "canary-clickhouse-password-91c2",
}
SERVICE_USERS = {
    "gateway": "nats_gateway",
    "session-manager": "nats_session_manager",
    "runtime-runner": "nats_runtime_runner",
    "event-store": "nats_event_store",
    "streams": "nats_admin",
}


def compose_command() -> list[str]:
    """The Compose CLI here: the docker plugin if installed, else Debian's docker-compose
    (.ci/run installs it, so CI never skips)."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is None:
        pytest.skip("no Compose CLI (docker compose / docker-compose) on this machine")
    return [legacy]


def compose_config(tmp_path: Path, values: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`config` with exactly `values` as the operator's variables: an env file of our own (so a
    deploy/.env on this machine changes nothing) and no TASKBUS_* from this process."""
    env_file = tmp_path / "operator.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("TASKBUS_")
    }
    return subprocess.run(
        [*compose_command(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The file as Compose resolves it (anchors merged, variables interpolated)."""
    done = compose_config(tmp_path_factory.mktemp("compose"), OPERATOR_VALUES)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def taskbus_services(config: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each Taskbus container: its name -> (program, resolved service)."""
    return {
        name: (service_of(service["image"], service.get("command")), service)
        for name, service in config["services"].items()
        if service["image"].startswith("taskbus-")
    }


def instances(config: dict[str, Any], program: str) -> dict[str, dict[str, Any]]:
    return {
        name: service for name, (of, service) in taskbus_services(config).items() if of == program
    }


def test_compose_config_passes(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) >= {"nats-1", "nats-2", "nats-3", "streams", "clickhouse"}


def test_refused_without_the_operator_secrets(tmp_path: Path) -> None:
    """No default LLM key or ClickHouse password: Compose refuses to start without them."""
    for missing in ("TASKBUS_LLM_API_KEY", "TASKBUS_CLICKHOUSE_PASSWORD"):
        values = {key: value for key, value in OPERATOR_VALUES.items() if key != missing}
        done = compose_config(tmp_path, values)
        assert done.returncode != 0, f"compose config passed without {missing}"
        assert missing in done.stderr


def test_instances_of_each_service(resolved: dict[str, Any]) -> None:
    counts = {
        program: len(instances(resolved, program))
        for program in ("gateway", "session-manager", "event-store", "runtime-runner", "streams")
    }
    assert counts == {
        "gateway": 2,
        "session-manager": 3,
        "event-store": 2,
        "runtime-runner": 2,
        "streams": 1,
    }
    published = [
        port["published"] if isinstance(port, dict) else port.split(":")[0]
        for service in instances(resolved, "gateway").values()
        for port in service["ports"]
    ]
    assert len(set(map(str, published))) == 2, f"two gateways on one host port: {published}"


def test_every_taskbus_variable_is_a_real_setting(resolved: dict[str, Any]) -> None:
    unknown = {
        f"{name}: {variable}"
        for name, (program, service) in taskbus_services(resolved).items()
        for variable in service.get("environment", {})
        if variable.startswith("TASKBUS_") and variable not in taskbus_variables(program)
    }
    assert not unknown, f"not a setting of that service: {sorted(unknown)}"


def test_stateful_instances_have_their_own_ids(resolved: dict[str, Any]) -> None:
    for program, variable in (
        ("session-manager", "TASKBUS_INSTANCE_ID"),
        ("event-store", "TASKBUS_INSTANCE_ID"),
        ("runtime-runner", "TASKBUS_RUNNER_ID"),
    ):
        ids = [
            service["environment"].get(variable)
            for service in instances(resolved, program).values()
        ]
        assert None not in ids and "" not in ids, f"a {program} without {variable}"
        assert len(set(ids)) == len(ids), f"{program}s share a {variable}: {ids}"


def test_runners_drive_docker_with_host_paths(resolved: dict[str, Any]) -> None:
    """The engine bind-mounts a workspace by its host path: each runner's workspace root is
    mounted at that same path, and no two runners share one."""
    roots = []
    for name, service in instances(resolved, "runtime-runner").items():
        environment = service["environment"]
        assert environment["TASKBUS_BACKEND"] == "docker", name
        assert int(environment["TASKBUS_RUNNER_SLOTS"]) >= 1, name
        volumes = [
            (volume["source"], volume["target"])
            if isinstance(volume, dict)
            else tuple(volume.split(":")[:2])
            for volume in service["volumes"]
        ]
        assert ("/var/run/docker.sock", "/var/run/docker.sock") in volumes, name
        root = environment["TASKBUS_WORKSPACE_ROOT"]
        assert any(
            source == target and root.startswith(target.rstrip("/") + "/")
            for source, target in volumes
        ), f"{name}: {root} is not under a same-path bind mount: {volumes}"
        roots.append(root)
    assert len(set(roots)) == len(roots)


def test_nats_cluster_of_three_with_tls_and_auth(resolved: dict[str, Any]) -> None:
    nodes = {
        name: service for name, service in resolved["services"].items() if name.startswith("nats-")
    }
    assert len(nodes) == 3
    for name, node in nodes.items():
        command = (
            " ".join(node["command"]) if isinstance(node["command"], list) else node["command"]
        )
        assert "-c /etc/nats/nats.conf" in command and f"-n {name}" in command
        others = set(nodes) - {name}
        assert {f"nats://{other}:6222" for other in others} <= set(
            command.split("--routes ", 1)[1].split()[0].split(",")
        ), f"{name} does not route to {others}"
        assert "nats" in node["networks"]["default"]["aliases"]
        data = [
            v
            for v in node["volumes"]
            if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/data"
        ]
        assert data, f"{name} keeps JetStream in its container layer"
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    assert "include ./auth.conf" in conf
    assert conf.count("tls {") == 2, "clients and routes must both speak TLS"
    assert "verify: true" in conf
    for forbidden in ("no_auth_user", "allow_non_tls", "password"):
        assert forbidden not in conf, f"nats.conf must not carry {forbidden}"


def test_each_service_logs_in_as_itself_over_tls(resolved: dict[str, Any]) -> None:
    for name, (program, service) in taskbus_services(resolved).items():
        environment = service["environment"]
        assert environment["TASKBUS_NATS_URL"].startswith("tls://"), name
        assert environment["TASKBUS_NATS_CA_FILE"] == "/run/secrets/nats_ca", name
        credentials = environment["TASKBUS_NATS_CREDENTIALS_FILE"]
        mounted = {
            (secret["source"], f"/run/secrets/{secret.get('target') or secret['source']}")
            for secret in service["secrets"]
        }
        assert (SERVICE_USERS[program], credentials) in mounted, f"{name}: {mounted}"
        others = {user for user in SERVICE_USERS.values() if user != SERVICE_USERS[program]}
        assert not others & {source for source, _ in mounted}, f"{name} holds another login"


def test_no_secret_value_in_the_file() -> None:
    """Secret variables name a file or take the operator's value with no default; secrets
    are files (kept out of git by deploy/.gitignore and deploy/nats/.gitignore)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    environments = [
        value for key, value in raw.items() if key.endswith("-env") or key == "x-bus"
    ] + [service.get("environment", {}) for service in raw["services"].values()]
    for environment in environments:
        for variable, value in environment.items():
            if variable == "<<" or not SECRET_NAME.search(variable) or variable.endswith("_FILE"):
                continue
            assert "${" in str(value) and ":?" in str(value), f"{variable}={value!r} is inline"
    assert all(set(secret) == {"file"} for secret in raw["secrets"].values())
    for secret in raw["secrets"].values():
        ignored = subprocess.run(["git", "-C", str(DEPLOY), "check-ignore", "-q", secret["file"]])
        assert ignored.returncode == 0, f"{secret['file']} is not git-ignored"


def test_operator_secrets_reach_only_their_users(resolved: dict[str, Any]) -> None:
    """The LLM key only session-managers see; the ClickHouse password only ClickHouse and the
    event stores."""
    readers = {
        "TASKBUS_LLM_API_KEY": {"session-manager"},
        "TASKBUS_CLICKHOUSE_PASSWORD": {"event-store", "clickhouse"},
    }
    for variable, allowed in readers.items():
        canary = OPERATOR_VALUES[variable]
        holders = {
            service_of(service["image"], service.get("command"))
            if service["image"].startswith("taskbus-")
            else name
            for name, service in resolved["services"].items()
            if canary in yaml.safe_dump(service)
        }
        assert holders == allowed, f"{variable} reaches {holders}"


def test_every_service_is_health_checked_and_only_the_runner_runs_as_root(
    resolved: dict[str, Any],
) -> None:
    for name, (program, service) in taskbus_services(resolved).items():
        if program == "streams":  # a one-shot job
            continue
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
        assert (service.get("user") == "root") == (program == "runtime-runner"), name


def test_the_image_caches_dependencies_apart_from_the_source_and_drops_root() -> None:
    """A source change reuses the dependency layer: it is built from the lock and every
    workspace package's manifest alone, before any source is copied."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    source_copied = dockerfile.index("COPY libs ./libs")
    assert dockerfile.index("--no-install-workspace") < source_copied
    for manifest in sorted(DEPLOY.parent.glob("*/*/pyproject.toml")):
        package = manifest.parent.relative_to(DEPLOY.parent)
        assert dockerfile.index(f"COPY {package}/pyproject.toml {package}/") < source_copied
    assert "\nUSER taskbus\n" in dockerfile
