"""Cloning the conversation's repository, without ever echoing credentials found in its URL."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from taskbus.contracts.redaction import redact
from taskbus.runtime_runner.sandbox import ActionError


def clone_command(repository: str, branch: str | None, target: Path) -> list[str]:
    command = ["git", "clone", "--quiet"]
    if branch:
        command += ["--branch", branch]
    return [*command, "--", repository, str(target)]


def _git_environment() -> dict[str, str]:
    """Never prompt for credentials: a clone that needs them fails instead of hanging."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "SSH_ASKPASS": "true",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
        "LANG": "C.UTF-8",
    }


async def clone(repository: str, branch: str | None, target: Path, seconds: float) -> None:
    """`git clone` into `target` (absent or empty); failures raise `ActionError(clone_failed)`."""
    process = await asyncio.create_subprocess_exec(
        *clone_command(repository, branch, target),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_git_environment(),
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(seconds):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ActionError("clone_failed", f"git clone of {redact(repository)} timed out") from None
    if process.returncode != 0:
        message = output.decode(errors="replace").strip() or f"git exited with {process.returncode}"
        raise ActionError("clone_failed", redact(message))
