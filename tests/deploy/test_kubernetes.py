"""deploy/k8s against Kubernetes' own schemas (kubernetes-validate, offline, strict: unknown
fields fail), and what an operator relies on: real settings and probes, one id per stateful
instance, NATS over TLS with one login per service, no secret in a manifest, and values for
the official NATS chart that turn on clustering, JetStream, TLS and the users."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kubernetes  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from taskbus.gateway.rest import router as gateway_routes

from .manifests import DEPLOY, SECRET_NAME, service_of, taskbus_variables

K8S = DEPLOY / "k8s"
# The Kubernetes version the manifests are checked against (a schema set the package ships).
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "taskbus"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Each program's NATS login, as a Secret (deploy/README.md creates them).
NATS_LOGINS = {
    "gateway": "taskbus-nats-gateway",
    "session-manager": "taskbus-nats-session-manager",
    "runtime-runner": "taskbus-nats-runtime-runner",
    "event-store": "taskbus-nats-event-store",
    "streams": "taskbus-nats-admin",
}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path, document))
    return documents


def workloads() -> Iterator[dict[str, Any]]:
    return (resource for _, resource in manifests() if resource["kind"] in WORKLOADS)


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Each Taskbus container: (program, container, its workload)."""
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("taskbus-"):
                yield service_of(container["image"], container.get("command")), container, workload


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def mounted_secret(pod: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    """The Secret whose volume holds `path` in `container`, if any."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            secret = volumes[mount["name"]].get("secret")
            return None if secret is None else str(secret["secretName"])
    return None


@pytest.mark.parametrize(
    ("path", "resource"),
    manifests(),
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_manifest_is_valid_kubernetes(path: Path, resource: dict[str, Any]) -> None:
    try:
        kubernetes.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes.ValidationError as error:
        pytest.fail(f"{path.name}: {error.caught}")


def test_the_validator_rejects_what_kubernetes_would() -> None:
    """The check above can fail: a misspelt field and a wrong type are both refused."""
    _, workload = next((p, r) for p, r in manifests() if r["kind"] == "Deployment")
    misspelt = yaml.safe_load(yaml.safe_dump(workload))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong_type = yaml.safe_load(yaml.safe_dump(workload))
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes.ValidationError):
            kubernetes.validate(broken, KUBERNETES_VERSION, strict=True)


def test_everything_is_in_the_namespace() -> None:
    for path, resource in manifests():
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == NAMESPACE, path.name


def test_every_program_is_deployed() -> None:
    programs = {program for program, _, _ in containers()}
    assert programs == set(NATS_LOGINS)
    replicas = {w["metadata"]["name"]: w["spec"].get("replicas") for w in workloads()}
    assert replicas["gateway"] >= 2
    assert replicas["session-manager"] >= 2
    assert replicas["event-store"] >= 2


def test_every_taskbus_variable_is_a_real_setting() -> None:
    unknown = {
        f"{program}: {name}"
        for program, container, _ in containers()
        for name in env(container)
        if name.startswith("TASKBUS_") and name not in taskbus_variables(program)
    }
    assert not unknown, f"not a setting of that service: {sorted(unknown)}"


def test_stateful_instances_have_their_own_ids() -> None:
    """Several instances of one template share its env: the id must come from the pod, and
    from something unique per pod (a StatefulSet's pod name, a DaemonSet's node)."""
    expected = {
        "session-manager": ("TASKBUS_INSTANCE_ID", "StatefulSet", "metadata.name"),
        "event-store": ("TASKBUS_INSTANCE_ID", "StatefulSet", "metadata.name"),
        "runtime-runner": ("TASKBUS_RUNNER_ID", "DaemonSet", "spec.nodeName"),
    }
    checked = set()
    for program, container, workload in containers():
        if program not in expected:
            continue
        variable, kind, field = expected[program]
        assert workload["kind"] == kind, program
        source = env(container)[variable]
        assert "value" not in source, f"{program}: one {variable} for every pod"
        assert source["valueFrom"]["fieldRef"]["fieldPath"] == field, program
        checked.add(program)
    assert checked == set(expected)


def test_each_service_logs_in_as_itself_over_tls() -> None:
    for program, container, workload in containers():
        pod = pod_of(workload)
        variables = env(container)
        assert variables["TASKBUS_NATS_URL"]["value"].startswith("tls://"), program
        ca = variables["TASKBUS_NATS_CA_FILE"]["value"]
        assert mounted_secret(pod, container, ca) == "taskbus-nats-ca", program
        credentials = variables["TASKBUS_NATS_CREDENTIALS_FILE"]["value"]
        assert mounted_secret(pod, container, credentials) == NATS_LOGINS[program], program
        others = set(NATS_LOGINS.values()) - {NATS_LOGINS[program]}
        held = {volume.get("secret", {}).get("secretName") for volume in pod["volumes"]}
        assert not others & held, f"{program} holds another service's login"


def test_no_secret_value_in_a_manifest() -> None:
    """Secrets are made by the operator (deploy/README.md), never kept here; a secret
    variable names a mounted file or reads a Secret."""
    for path, resource in manifests():
        assert resource["kind"] != "Secret", f"{path.name} carries a Secret"
    for program, container, workload in containers():
        pod = pod_of(workload)
        for name, variable in env(container).items():
            if not SECRET_NAME.search(name):
                continue
            if name.endswith("_FILE"):
                assert mounted_secret(pod, container, variable["value"]), f"{program}: {name}"
            else:
                assert "secretKeyRef" in variable.get("valueFrom", {}), f"{program}: {name}"
    (clickhouse,) = [w for w in workloads() if w["metadata"]["name"] == "clickhouse"]
    password = env(pod_of(clickhouse)["containers"][0])["CLICKHOUSE_PASSWORD"]
    assert "secretKeyRef" in password["valueFrom"]


def test_the_readme_creates_every_secret_the_manifests_use() -> None:
    used = set()
    for workload in workloads():
        pod = pod_of(workload)
        used |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for container in pod["containers"]:
            used |= {
                v["valueFrom"]["secretKeyRef"]["name"]
                for v in container.get("env", [])
                if "secretKeyRef" in v.get("valueFrom", {})
            }
    values = nats_values()
    used |= {values["config"]["nats"]["tls"]["secretName"], values["tlsCA"]["secretName"]}
    used |= {patch["value"]["secret"]["secretName"] for patch in values["podTemplate"]["patch"]}
    readme = (DEPLOY / "README.md").read_text()
    created = set(re.findall(r"kubectl -n taskbus create secret \w+ ([\w-]+)", readme))
    assert used <= created, f"used but never created: {sorted(used - created)}"


def test_probes_hit_real_endpoints() -> None:
    """The gateway's readiness probe asks /api/health on the port the gateway listens on."""
    gateway_paths = {route.path for route in gateway_routes.routes}  # type: ignore[attr-defined]
    for program, container, _ in containers():
        if program != "gateway":
            continue
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] in gateway_paths
        assert ports[probe["port"]] == int(env(container)["TASKBUS_PORT"]["value"])
        assert env(container)["TASKBUS_HOST"]["value"] == "0.0.0.0"


def test_every_container_requests_resources() -> None:
    for workload in workloads():
        for container in pod_of(workload)["containers"]:
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), workload["metadata"]["name"]
            assert "memory" in container["resources"].get("limits", {}), workload["metadata"][
                "name"
            ]


def nats_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((K8S / "helm" / "nats-values.yaml").read_text())
    return values


def test_nats_chart_values_cluster_jetstream_tls_and_users() -> None:
    values = nats_values()
    config = values["config"]
    assert config["cluster"]["enabled"] is True and config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["nats"]["tls"]["enabled"] is True
    assert config["cluster"]["tls"]["enabled"] is True
    assert config["cluster"]["tls"]["merge"]["verify"] is True
    assert values["tlsCA"]["enabled"] is True
    # The users file: included relative to the chart's /etc/nats-config/nats.conf, from the
    # directory the auth Secret is mounted at.
    include = Path(os.path.normpath(Path("/etc/nats-config") / config["merge"]["$include"]))
    mounts = [p["value"] for p in values["container"]["patch"] if p["path"] == "/volumeMounts/-"]
    volumes = [p["value"] for p in values["podTemplate"]["patch"] if p["path"] == "/spec/volumes/-"]
    (mount,) = [m for m in mounts if Path(m["mountPath"]) == include.parent]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "taskbus-nats-auth"
    assert include.name == "auth.conf"
    assert values["natsBox"]["enabled"] is False


def test_only_the_runner_runs_as_root_and_the_others_are_probed_on_their_metrics() -> None:
    for program, container, _ in containers():
        security = container.get("securityContext", {})
        if program == "runtime-runner":
            assert security == {"runAsUser": 0}
        else:
            assert security["runAsNonRoot"] and security["runAsUser"] != 0, program
        if program in ("gateway", "streams"):  # the gateway's probes: test_probes_hit_...
            continue
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        probe = container["livenessProbe"]["httpGet"]
        assert probe["path"] == "/metrics"
        assert ports[probe["port"]] == int(env(container)["TASKBUS_METRICS_PORT"]["value"])
