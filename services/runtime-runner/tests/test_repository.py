"""Cloning the repository into a new sandbox, and keeping credentials out of messages."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from taskbus.contracts.redaction import redact
from taskbus.runtime_runner.sandbox import ActionError, CommandRequest

from .conftest import SandboxMaker
from .test_shell_contract import Chunks


def test_credentials_in_urls_are_removed() -> None:
    text = "fatal: could not read from 'https://bob:s3cret@git.example.com/r.git' and ssh://tok@h/x"
    assert redact(text) == (
        "fatal: could not read from 'https://git.example.com/r.git' and ssh://h/x"
    )
    assert redact("/srv/repos/plain.git") == "/srv/repos/plain.git"


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A local repository with a `feature` branch that has its own file."""
    repo = tmp_path / "origin"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "README.md").write_text("main\n")
    git("add", ".")
    git("commit", "-m", "main")
    git("checkout", "-b", "feature")
    (repo / "feature.txt").write_text("on feature\n")
    git("add", ".")
    git("commit", "-m", "feature")
    git("checkout", "main")
    return repo


async def test_repository_is_cloned_at_the_branch_before_the_shell_starts(
    make_sandbox: SandboxMaker, origin: Path
) -> None:
    sandbox = await make_sandbox(str(origin), "feature")
    assert await sandbox.read_bytes("feature.txt") == b"on feature\n"
    outcome = await sandbox.run_command(
        CommandRequest(command="git branch --show-current"), Chunks()
    )
    assert outcome.content.strip() == "feature"
    assert outcome.cwd == sandbox.workspace


async def test_a_failed_clone_reports_git_without_credentials(make_sandbox: SandboxMaker) -> None:
    with pytest.raises(ActionError) as failed:
        await make_sandbox("https://bob:s3cret@127.0.0.1:9/nothing.git")
    assert failed.value.code == "clone_failed"
    assert "s3cret" not in failed.value.message and "bob" not in failed.value.message
    assert "127.0.0.1" in failed.value.message


async def test_an_unknown_branch_fails_the_clone(make_sandbox: SandboxMaker, origin: Path) -> None:
    with pytest.raises(ActionError) as failed:
        await make_sandbox(str(origin), "no-such-branch")
    assert failed.value.code == "clone_failed"
    assert "no-such-branch" in failed.value.message
