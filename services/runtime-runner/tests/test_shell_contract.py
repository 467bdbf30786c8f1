"""Contract of the persistent shell, run against every sandbox backend."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import time

import pytest

from taskbus.contracts.events import CommandTimeout
from taskbus.runtime_runner.sandbox import ActionError, CommandOutcome, CommandRequest, Sandbox

from .conftest import TEST_LIMITS


class Chunks:
    """Collects the live output a command streams."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def __call__(self, text: str) -> None:
        self.texts.append(text)


async def run(sandbox: Sandbox, command: str, **options: object) -> CommandOutcome:
    return await sandbox.run_command(CommandRequest(command=command, **options), Chunks())  # type: ignore[arg-type]


async def test_cwd_and_environment_persist_between_commands(sandbox: Sandbox) -> None:
    first = await run(sandbox, "mkdir -p sub/dir && cd sub/dir && export GREETING='hi there'")
    assert first.exit_code == 0
    assert first.cwd.endswith("/sub/dir")
    second = await run(sandbox, 'echo "$GREETING"; pwd')
    assert second.content.splitlines() == ["hi there", first.cwd]
    assert second.exit_code == 0


async def test_exit_code_stderr_and_multi_line_commands(sandbox: Sandbox) -> None:
    failed = await run(sandbox, "echo to-stderr >&2; false")
    assert failed.exit_code == 1
    assert "to-stderr" in failed.content
    script = await run(sandbox, 'for i in 1 2; do\n  echo "it\'s $i"\ndone\nif\n')
    assert "it's 1\nit's 2" in script.content
    assert "syntax error" in script.content
    assert script.exit_code == 2


async def test_soft_timeout_keeps_the_command_and_an_empty_command_gets_the_rest(
    sandbox: Sandbox,
) -> None:
    started = time.monotonic()
    soft = await run(sandbox, "echo begun; sleep 2.5; echo finished")
    assert time.monotonic() - started < 2.5  # returned before the command could finish
    assert soft.timed_out == CommandTimeout.SOFT
    assert soft.exit_code == -1
    assert "begun" in soft.content
    assert "[command still running" in soft.content
    with pytest.raises(ActionError) as refused:
        await run(sandbox, "echo queue-jumper")
    assert refused.value.code == "command_running"
    outcome = soft
    for _ in range(5):
        outcome = await run(sandbox, "")
        if outcome.timed_out != CommandTimeout.SOFT:
            break
    assert outcome.timed_out == CommandTimeout.NONE
    assert outcome.exit_code == 0
    assert "finished" in outcome.content
    assert "begun" not in outcome.content  # already reported


async def test_input_answers_a_program_waiting_on_stdin(sandbox: Sandbox) -> None:
    waiting = await run(sandbox, "python3 -c \"print('got', input())\"")
    assert waiting.timed_out == CommandTimeout.SOFT
    answered = await run(sandbox, "hello world", is_input=True)
    assert answered.content.strip() == "got hello world"
    assert answered.exit_code == 0


async def test_control_c_interrupts_the_running_command_and_keeps_the_shell(
    sandbox: Sandbox,
) -> None:
    await run(sandbox, "export KEPT=yes")
    soft = await run(sandbox, "sleep 100")
    assert soft.timed_out == CommandTimeout.SOFT
    started = time.monotonic()
    interrupted = await run(sandbox, "C-c", is_input=True)
    assert time.monotonic() - started < 5 * TEST_LIMITS.no_change_seconds  # not `sleep 100`
    assert interrupted.exit_code == 130
    assert interrupted.timed_out == CommandTimeout.NONE
    assert (await run(sandbox, "echo $KEPT")).content.strip() == "yes"


async def test_control_c_also_stops_a_shell_loop(sandbox: Sandbox) -> None:
    await run(sandbox, "while true; do sleep 0.2; done")
    interrupted = await run(sandbox, "C-c", is_input=True)
    if interrupted.timed_out == CommandTimeout.SOFT:
        # A loaded host (CI) took longer than TEST_LIMITS' no_change_seconds to end the loop:
        # wait on for it, as an agent would. A loop the C-c did not stop fails here too.
        interrupted = await run(sandbox, "")
    assert interrupted.exit_code == 130
    assert (await run(sandbox, "echo alive")).content.strip() == "alive"


async def test_input_or_waiting_without_a_running_command_is_refused(sandbox: Sandbox) -> None:
    for request in (CommandRequest(command=""), CommandRequest(command="y", is_input=True)):
        with pytest.raises(ActionError) as refused:
            await sandbox.run_command(request, Chunks())
        assert refused.value.code == "no_running_command"


async def test_hard_timeout_kills_the_command_and_the_shell_stays_usable(
    sandbox: Sandbox,
) -> None:
    await run(sandbox, "export KEPT=yes")
    started = time.monotonic()
    killed = await run(sandbox, "sleep 100", blocking=True, timeout=1.5)
    assert 1.4 < time.monotonic() - started < 4.0
    assert killed.timed_out == CommandTimeout.HARD
    assert killed.exit_code == 130
    assert "[command killed: it ran longer than 1.5 s]" in killed.content
    assert (await run(sandbox, "echo $KEPT")).content.strip() == "yes"


async def test_hard_timeout_kills_a_program_that_ignores_interrupts(sandbox: Sandbox) -> None:
    stubborn = (
        'python3 -c "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); '
        "print('ignoring', flush=True); time.sleep(100)\""
    )
    killed = await run(sandbox, stubborn, blocking=True, timeout=1)
    assert killed.timed_out == CommandTimeout.HARD
    assert killed.exit_code == 137  # SIGKILL
    assert "ignoring" in killed.content
    assert (await run(sandbox, "echo alive")).exit_code == 0


async def test_the_hard_limit_counts_from_the_start_across_soft_timeouts(
    sandbox: Sandbox,
) -> None:
    soft = await run(sandbox, "sleep 100", timeout=2)
    assert soft.timed_out == CommandTimeout.SOFT
    outcome = soft
    for _ in range(5):
        outcome = await run(sandbox, "")
        if outcome.timed_out != CommandTimeout.SOFT:
            break
    assert outcome.timed_out == CommandTimeout.HARD


async def test_exiting_the_shell_starts_a_new_one_and_says_so(sandbox: Sandbox) -> None:
    await run(sandbox, "cd / && export GONE=1")
    exited = await run(sandbox, "exit 3")
    assert exited.exit_code == 3
    assert "the shell exited" in exited.content
    fresh = await run(sandbox, 'echo "[$GONE]"; pwd')
    assert "a new shell was started" in fresh.content
    assert "[]" in fresh.content
    assert fresh.cwd == sandbox.workspace


async def test_output_streams_in_batches_not_per_line(sandbox: Sandbox) -> None:
    chunks = Chunks()
    outcome = await sandbox.run_command(
        CommandRequest(command="seq 1 2000; sleep 0.5; echo tail-line; sleep 0.5"), chunks
    )
    streamed = "".join(chunks.texts)
    assert "1\n2\n3\n" in streamed and "2000" in streamed and "tail-line" in streamed
    assert 2 <= len(chunks.texts) <= 5
    assert outcome.exit_code == 0


async def test_fifty_megabytes_of_output_are_capped_in_bounded_memory(sandbox: Sandbox) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    chunks = Chunks()
    outcome = await sandbox.run_command(
        CommandRequest(command="head -c 50000000 /dev/zero | tr '\\0' a; echo; echo END"), chunks
    )
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = 50_000_000 + len("\nEND\n")
    assert outcome.exit_code == 0
    assert outcome.truncated_bytes == total - TEST_LIMITS.max_output_bytes
    assert f"[... {outcome.truncated_bytes} bytes of output omitted ...]" in outcome.content
    assert outcome.content.rstrip().endswith("END")
    assert len(outcome.content) < TEST_LIMITS.max_output_bytes + 200
    streamed = sum(len(text) for text in chunks.texts)
    assert streamed <= TEST_LIMITS.max_streamed_bytes + TEST_LIMITS.max_output_bytes + 200
    assert peak_after - peak_before < 30 * 1024


async def test_a_process_that_left_the_shells_session_is_paused_and_removed_with_it(
    sandbox: Sandbox,
) -> None:
    """`setsid` puts a process out of the shell's session and process group; it still belongs
    to the sandbox."""
    tag = f"escapee-{time.monotonic_ns()}"
    loop = "while :; do echo tick >> ticks; sleep 0.05; done"
    await run(sandbox, f"setsid sh -c '{loop}' {tag} > /dev/null 2>&1 < /dev/null &")

    async def ticks() -> int:
        try:
            return (await sandbox.read_bytes("ticks")).count(b"\n")
        except ActionError:
            return 0

    async def ticking() -> bool:
        before = await ticks()
        await asyncio.sleep(0.4)
        return await ticks() > before

    assert await ticking()
    await sandbox.pause()
    await asyncio.sleep(0.2)
    assert not await ticking()
    await sandbox.resume()
    assert await ticking()

    await sandbox.close()
    for _ in range(100):
        if not running(tag):
            break
        await asyncio.sleep(0.05)
    assert not running(tag)


def running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0
