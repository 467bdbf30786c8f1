"""What deploy/ may name: each program's real settings, read from its settings Structs."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from taskbus.contracts import bus
from taskbus.contracts.config import PREFIX
from taskbus.contracts.streams import StreamLimits, _Replicas
from taskbus.event_store.settings import EventStoreSettings
from taskbus.gateway.settings import GatewaySettings
from taskbus.runtime_runner.settings import RuntimeRunnerSettings
from taskbus.session_manager.settings import SessionManagerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# Read by every service outside its settings Struct, when it logs in (contracts/bus.py).
_BUS_VARIABLES = {bus.CREDENTIALS_FILE_ENV, bus.CA_FILE_ENV}

_SETTINGS: dict[str, tuple[type[msgspec.Struct], ...]] = {
    "gateway": (GatewaySettings,),
    "session-manager": (SessionManagerSettings,),
    "runtime-runner": (RuntimeRunnerSettings,),
    "event-store": (EventStoreSettings,),
    # The one-shot `python -m taskbus.contracts.streams`: its replicas and the stream limits.
    "streams": (_Replicas, StreamLimits),
}

# Variable names whose value is a secret: they may name a file or a Secret, never hold one.
SECRET_NAME = re.compile(r"PASSWORD|API_KEY|SECRETS?_KEY|TOKEN|DSN|CREDENTIAL", re.IGNORECASE)


def service_of(image: str, command: object) -> str:
    """Which Taskbus program a container runs: the image `taskbus-<service>[:tag]`, except the
    streams job, which runs the event-store image with another command."""
    if "taskbus.contracts.streams" in str(command):
        return "streams"
    name = image.rsplit("/", 1)[-1].split(":", 1)[0]
    assert name.startswith("taskbus-"), f"not a Taskbus image: {image}"
    return name.removeprefix("taskbus-")


def taskbus_variables(service: str) -> set[str]:
    """Every TASKBUS_* variable `service` reads."""
    fields = {field for struct in _SETTINGS[service] for field in struct.__struct_fields__}
    # The streams job takes its URL from bus.nats_url_from_env, not from a Struct.
    url = {"TASKBUS_NATS_URL"} if service == "streams" else set()
    return {PREFIX + field.upper() for field in fields} | _BUS_VARIABLES | url
