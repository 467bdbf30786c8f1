"""Whether `taskbus up` may run sandboxes without isolation, decided before anything starts.

The runner picks its backend itself (`auto`: docker when an engine answers and has the sandbox
image, else local under bubblewrap) and reports the isolation it got (KV `taskbus_runners`).
Without docker and bwrap there is nothing to isolate with: the two README commands must still
work on a fresh laptop, so a single-user loopback stack (one API key, gateway on loopback) runs
unsandboxed and says so loudly; any other stack refuses to start unless the operator set
`TASKBUS_ALLOW_UNSANDBOXED=1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import httpx

ALLOW_UNSANDBOXED_ENV = "TASKBUS_ALLOW_UNSANDBOXED"
INSTALL_BWRAP = "sudo apt-get install bubblewrap"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_DOCKER_SOCKET = "/var/run/docker.sock"
_PROBE_SECONDS = 5.0


class UnsandboxedRefused(RuntimeError):
    """Sandboxes could not be isolated and this stack is not one where that may be allowed."""


def needs_unsandboxed(backend: str, docker_usable: bool, bwrap_usable: bool) -> bool:
    """Whether the runner would have to run sandboxes with no isolation at all."""
    if backend == "docker":
        return False  # the runner fails if docker is missing; it never falls back
    if backend == "auto" and docker_usable:
        return False
    return not bwrap_usable


def allow_unsandboxed(single_user_loopback: bool, operator_opt_in: bool) -> bool:
    """Raise `UnsandboxedRefused` unless running unsandboxed may be allowed here."""
    if operator_opt_in or single_user_loopback:
        return True
    raise UnsandboxedRefused(
        "refusing to start: neither Docker (engine and sandbox image) nor bubblewrap is usable,"
        " so sandboxes would run unisolated as this user, and this stack has more than one API"
        " key or a gateway bound beyond loopback. Install bubblewrap"
        f" (`{INSTALL_BWRAP}`) or build the Docker sandbox image (`uv run just sandbox-image`),"
        f" or accept the risk with {ALLOW_UNSANDBOXED_ENV}=1."
    )


def is_single_user_loopback(api_keys_file: Path, host: str) -> bool:
    keys = [line for line in api_keys_file.read_text().splitlines() if "=" in line]
    return len(keys) == 1 and host in LOOPBACK_HOSTS


async def docker_usable(image: str, environ: Mapping[str, str]) -> bool:
    """A Docker engine answers on its unix socket and has `image`."""
    docker_host = environ.get("DOCKER_HOST", f"unix://{_DOCKER_SOCKET}")
    if not docker_host.startswith("unix://"):
        return True  # a remote engine: let the runner find out, it fails loudly
    transport = httpx.AsyncHTTPTransport(uds=docker_host.removeprefix("unix://"))
    async with httpx.AsyncClient(transport=transport, base_url="http://docker") as client:
        try:
            name = urllib.parse.quote(image, safe="")
            response = await client.get(f"/images/{name}/json", timeout=_PROBE_SECONDS)
        except httpx.HTTPError:
            return False
    return response.status_code == 200


async def bwrap_usable() -> bool:
    """bubblewrap is installed and can create the namespaces a sandbox needs here."""
    bwrap = shutil.which("bwrap")  # found as the runner finds it: on PATH
    if bwrap is None:
        return False
    probe = await asyncio.create_subprocess_exec(
        bwrap,
        *("--unshare-user", "--unshare-pid", "--unshare-ipc", "--die-with-parent"),
        *("--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(_PROBE_SECONDS):
            return await probe.wait() == 0
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            probe.kill()
        await probe.wait()
        return False


async def runner_may_run_unsandboxed(environ: Mapping[str, str], api_keys_file: Path) -> bool:
    """True when the runner must be told it may run unsandboxed (see the module docstring)."""
    backend = environ.get("TASKBUS_BACKEND", "auto")
    image = environ.get("TASKBUS_SANDBOX_IMAGE", "taskbus-sandbox:latest")
    docker = backend == "auto" and await docker_usable(image, environ)
    if not needs_unsandboxed(backend, docker, await bwrap_usable()):
        return False
    host = environ.get("TASKBUS_HOST", "127.0.0.1")
    # The spellings the runner's settings parse as true, so the two never disagree.
    opt_in = environ.get(ALLOW_UNSANDBOXED_ENV, "").lower() in {"1", "true"}
    return allow_unsandboxed(is_single_user_loopback(api_keys_file, host), opt_in)
