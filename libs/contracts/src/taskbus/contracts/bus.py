"""Connecting to NATS as one service, with that service's own credential.

Every service connects through `connect`. With `TASKBUS_NATS_CREDENTIALS_FILE` set (by
`taskbus up`, or a deployment's secret) it logs in as the user in that file and uses inboxes
under `_INBOX_<user>`, the only inboxes its permissions let it read. Without it, it connects
anonymously, which only an open development server accepts. The password travels in the
CONNECT frame only: never in a URL, an argument list or a log line.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client

CREDENTIALS_FILE_ENV = "TASKBUS_NATS_CREDENTIALS_FILE"
# CA bundle that signed the servers' TLS certificates (deploy/nats); implies TLS.
CA_FILE_ENV = "TASKBUS_NATS_CA_FILE"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class BusCredential(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    password: str

    def __repr__(self) -> str:
        return f"BusCredential(user={self.user!r}, password=<redacted>)"


def inbox_prefix(user: str) -> str:
    """Each user may subscribe only to its inboxes, so none reads the replies of another."""
    return f"_INBOX_{user}"


def read_credential(path: Path) -> BusCredential:
    return msgspec.json.decode(path.read_bytes(), type=BusCredential)


def write_credential(path: Path, credential: BusCredential) -> None:
    """Write the file readable by its owner only (0600), from its creation on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(msgspec.json.encode(credential))
    path.chmod(0o600)


def nats_url_from_env() -> str:
    return os.environ.get("TASKBUS_NATS_URL", DEFAULT_NATS_URL)


async def connect(
    url: str, name: str, credential: BusCredential | None = None, **options: Any
) -> Client:
    """`nats.connect` with `credential`, else the one of this process's environment, and TLS
    when a CA file is configured."""
    credential = credential or environment_credential()
    if credential is not None:
        options.update(
            user=credential.user,
            password=credential.password,
            inbox_prefix=inbox_prefix(credential.user),
        )
    tls = environment_tls()
    if tls is not None:
        options["tls"] = tls
    return await nats.connect(url, name=name, **options)


def environment_credential() -> BusCredential | None:
    """This process's login, from `TASKBUS_NATS_CREDENTIALS_FILE`; None: anonymous."""
    credentials_file = os.environ.get(CREDENTIALS_FILE_ENV)
    return read_credential(Path(credentials_file)) if credentials_file else None


def environment_tls() -> ssl.SSLContext | None:
    """TLS trusting `TASKBUS_NATS_CA_FILE`, when one is configured."""
    ca_file = os.environ.get(CA_FILE_ENV)
    return ssl.create_default_context(cafile=ca_file) if ca_file else None
