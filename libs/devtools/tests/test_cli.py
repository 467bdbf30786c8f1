"""The CLI without a stack: where it finds the gateway and key, and the errors it gives when it
cannot use them. Each error is one line on stderr with a hint and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from taskbus.devtools.cli import app
from taskbus.devtools.cli_render import LiveView, activity, conversation_table
from taskbus.devtools.client import ClientConfig, CliError, load_config, save_config
from taskbus.devtools.nats_server import free_port


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A user with an empty config dir and no TASKBUS_* in the environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKBUS_")}
    return {**clean, "XDG_CONFIG_HOME": str(tmp_path / "config"), "COLUMNS": "200"}


def invoke(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_the_key_comes_from_env_or_the_config_file_never_the_cwd(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old CLI read ./.taskbus/api_keys: a key there must not be picked up.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".taskbus").mkdir()
    (tmp_path / ".taskbus" / "api_keys").write_text("tb_from_cwd=local\n")
    code, _, stderr = invoke(env, "ls")
    line = one_line_error(stderr)
    assert code == 1 and "no API key" in line and "taskbus up" in line

    saved = save_config(ClientConfig(url="http://127.0.0.1:9", api_key="tb_file"), env)
    assert saved == tmp_path / "config" / "taskbus" / "config.toml"
    assert saved.stat().st_mode & 0o077 == 0
    assert load_config(env) == ClientConfig(url="http://127.0.0.1:9", api_key="tb_file")
    overridden = load_config({**env, "TASKBUS_API_KEY": "tb_env", "TASKBUS_URL": "http://h:1"})
    assert (overridden.url, overridden.api_key) == ("http://h:1", "tb_env")

    saved.write_text("url = [broken")
    with pytest.raises(CliError, match="not valid TOML"):
        load_config(env)


def test_gateway_down_is_one_line_with_a_hint(env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    for args in (["ls"], ["watch", "c1"], ["stop", "c1"]):
        code, _, stderr = invoke({**env, "TASKBUS_URL": url, "TASKBUS_API_KEY": "k"}, *args)
        line = one_line_error(stderr)
        assert code == 1 and f"cannot reach the gateway at {url}" in line and "taskbus up" in line


def test_an_unknown_kind_is_refused_with_the_valid_ones(env: dict[str, str]) -> None:
    env = {**env, "TASKBUS_URL": f"http://127.0.0.1:{free_port()}", "TASKBUS_API_KEY": "k"}
    code, stdout, stderr = invoke(env, "events", "c1", "--kind", "CmdRunActon")
    line = one_line_error(stderr)
    assert code == 1 and stdout == ""
    assert "unknown event kind 'CmdRunActon'" in line and "did you mean CmdRunAction?" in line
    assert "TaskTrackingAction" in line  # the valid kinds are listed


def test_usage_errors_are_one_line_too(env: dict[str, str]) -> None:
    """Through the real `taskbus` entry point (its own handling of click's usage errors)."""
    for args, words in (
        (["ls", "--status", "nope"], ["'nope' is not one of", "`taskbus ls --help`"]),
        (["stop"], ["Missing parameter", "`taskbus stop --help`"]),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "taskbus.devtools.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        line = one_line_error(done.stderr)
        assert done.returncode == 2 and all(word in line for word in words), line


def test_down_and_status_without_a_stack(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "TASKBUS_DATA_DIR": str(tmp_path / "data")}
    code, stdout, _ = invoke(env, "down")
    assert code == 0 and "not running" in stdout
    code, _, stderr = invoke(env, "status")
    assert code == 1 and "taskbus up" in one_line_error(stderr)


def test_ls_shows_whole_ids_cost_and_times() -> None:
    row = {
        "conversation_id": "0123456789abcdef0123456789abcdef",
        "title": "a title",
        "taskbus_status": "FINISHED",
        "accumulated_cost": 0.0265,
        "created_at": "2024-05-01T10:00:00Z",
        "last_updated_at": "2024-05-01T10:05:00Z",
    }
    narrow = Console(width=60, record=True)
    narrow.print(conversation_table([row]))
    assert "0123456789abcdef0123456789abcdef" in narrow.export_text()  # never cut
    wide = Console(width=120, record=True)
    wide.print(conversation_table([row]))
    text = wide.export_text()
    assert text.split()[:6] == ["ID", "TITLE", "STATUS", "COST", "CREATED", "UPDATED"]
    assert "$0.0265" in text and "FINISHED" in text and text.count("2024-05-01") == 2


def test_the_live_view_follows_the_plan_and_who_is_at_work() -> None:
    view = LiveView()
    plan = [{"id": "1", "title": "Write it", "status": "in_progress"}]
    view.update({"kind": "TaskTrackingAction", "source": "agent", "args": {"task_list": plan}})
    assert view.plan == plan and view.doing == "running TaskTrackingAction"
    observation = {"kind": "CmdOutputObservation", "source": "environment", "observation": "run"}
    assert activity(observation) == "agent thinking (waiting on the LLM)"
    assert activity({"kind": "AgentStateChanged", "agent_state": "awaiting_user_input"}) is None
    finished = {"kind": "ConversationStatusChanged", "status": "FINISHED"}
    assert activity(finished) is None
    waiting = {"kind": "LLMWaiting", "elapsed_seconds": 45.2, "attempt": 2, "attempts": 4}
    assert activity(waiting | {"timeout_seconds": 120.0}) == (
        "waiting on the LLM for 45s (attempt 2 of 4, 120s each)"
    )
