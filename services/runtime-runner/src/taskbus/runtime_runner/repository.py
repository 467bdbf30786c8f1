"""Cloning the conversation's repository on this host, with the user's token if it needs one,
without ever echoing a credential.

The token travels as git's credential helper answers it: a helper defined on git's command
line (after `credential.helper=` clears every helper the host configured) reads it from git's
environment, and answers only requests to the resolved URL's protocol and host, so a redirect
elsewhere is never sent it. So it is in no URL, no argv (the helper's `printf` is the shell's
builtin), not in the clone's .git/config (`git -c` configures this one run), and never in the
sandbox, which starts after the clone.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from taskbus.contracts.redaction import redact
from taskbus.runtime_runner.credentials import GitCredential
from taskbus.runtime_runner.sandbox import ActionError

# Answers `get` for the expected protocol and host only; the token stays in the environment.
_CREDENTIAL_HELPER = (
    "!taskbus_credential() {"
    ' test "$1" = get || return 0;'
    " while IFS='=' read -r key value; do"
    ' case "$key" in protocol) p="$value";; host) h="$value";; esac;'
    " done;"
    ' if [ "$p" = "$TASKBUS_GIT_PROTOCOL" ] && [ "$h" = "$TASKBUS_GIT_HOST" ]; then'
    ' printf \'username=%s\\npassword=%s\\n\' "$TASKBUS_GIT_USERNAME" "$TASKBUS_GIT_TOKEN";'
    " fi;"
    " }; taskbus_credential"
)
# What git prints when a server wanted credentials it did not get or did not accept.
_AUTHENTICATION_REFUSED = (
    "Authentication failed",
    "could not read Username",
    "could not read Password",
    "terminal prompts disabled",
    "The requested URL returned error: 401",
    "The requested URL returned error: 403",
)


def clone_command(
    repository: str, branch: str | None, target: Path, credential: GitCredential | None = None
) -> list[str]:
    # No helper of the host's (e.g. one storing the operator's own credentials) ever answers.
    command = ["git", "-c", "credential.helper="]
    if credential is not None:
        command += ["-c", f"credential.helper={_CREDENTIAL_HELPER}"]
    command += ["clone", "--quiet"]
    if branch:
        command += ["--branch", branch]
    return [*command, "--", repository, str(target)]


def _git_environment(credential: GitCredential | None) -> dict[str, str]:
    """Never prompt for credentials: a clone that needs them fails instead of hanging."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "SSH_ASKPASS": "true",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
        "LANG": "C.UTF-8",
    }
    if credential is not None:
        environment |= {
            "TASKBUS_GIT_USERNAME": credential.username,
            "TASKBUS_GIT_TOKEN": credential.token,
            "TASKBUS_GIT_PROTOCOL": credential.protocol,
            "TASKBUS_GIT_HOST": credential.host,
        }
    return environment


def _failure(output: str, credential: GitCredential | None) -> str:
    """git's message, said plainly when authentication was the problem."""
    if not any(sign in output for sign in _AUTHENTICATION_REFUSED):
        return output
    if credential is None:
        why = (
            "no token was offered: store one with POST /api/add-git-providers and name its "
            "provider in the conversation's git_provider"
        )
    else:
        why = f"the token offered to {credential.host} was not accepted"
    return f"authentication was refused ({why}). git said: {output}"


async def clone(
    repository: str,
    branch: str | None,
    target: Path,
    seconds: float,
    credential: GitCredential | None = None,
) -> None:
    """`git clone` into `target` (absent or empty); failures raise `ActionError(clone_failed)`."""
    process = await asyncio.create_subprocess_exec(
        *clone_command(repository, branch, target, credential),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_git_environment(credential),
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
        if credential is not None:
            message = message.replace(credential.token, "<secret_hidden>")
        raise ActionError("clone_failed", redact(_failure(message, credential)))


async def head_commit(workspace: Path) -> str | None:
    """The commit a fresh clone checked out (the base of the workspace's git changes), or None
    when there is none (an empty repository)."""
    process = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(workspace),
        "rev-parse",
        "--verify",
        "--quiet",
        "HEAD",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=_git_environment(None),
    )
    output, _ = await process.communicate()
    commit = output.decode().strip()
    return commit if process.returncode == 0 and commit else None
