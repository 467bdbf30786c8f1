"""An LLM that accepts a call and never answers is a visible state (issue 13): `LLMWaiting`
heartbeats while an attempt waits, the attempt abandoned at `llm_timeout_seconds`, and after the
last one the conversation in ERROR with reason `llm_timeout`, never a silent RUNNING.

Against real NATS, real litellm and the scripted model told to hang (`delay`), with tiny
settings so the whole file takes seconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from taskbus.contracts.commands import StopConversation
from taskbus.contracts.events import (
    ConversationStatusChanged,
    ErrorObservation,
    LLMMetrics,
    LLMWaiting,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus

from .test_agent_loop import (
    agent_stack,
    agent_states,
    finish,
    send,
    status_reached,
    statuses,
    think,
)

HANG = {"seconds": 3600}  # released when the scripted model stops
# Room for about a dozen beats an attempt, of which the test needs two: a loaded CI worker can
# stall the event loop for a second (CI once heard a second attempt only at 1.18s of 1.5s).
TIMEOUT = 3.0
TINY = {"llm_timeout_seconds": TIMEOUT, "llm_heartbeat_seconds": 0.25, "llm_num_retries": 1}


def _beats(events: list[object]) -> list[LLMWaiting]:
    return [e for e in events if isinstance(e, LLMWaiting)]


async def test_a_hung_model_heartbeats_then_fails_with_llm_timeout_and_a_stop_silences_it(
    tmp_path: Path,
) -> None:
    script = {"steps": [{**think("never said"), "delay": HANG}]}
    spec = ConversationSpec(initial_user_msg="Hi.")
    async with (
        agent_stack(tmp_path, script, **TINY) as stack,
        stack.conversation("hana", spec) as runtime,
        stack.conversation("omar", ConversationSpec(initial_user_msg="Hello.")) as stopped,
    ):
        # omar is stopped while its model hangs: its heartbeats end and no error follows.
        await stopped.wait_for(lambda events: bool(_beats(events)))
        await send(
            stack.js,
            StopConversation(user_id="omar", conversation_id=stopped.cid),
            "StopConversation",
        )
        await stopped.wait_for(status_reached(ConversationStatus.STOPPED))
        await runtime.wait_for(status_reached(ConversationStatus.ERROR))
        # omar's call went on to its last deadline, about when hana's did (both started
        # together): had it appended anything, it would be in by now.
        await asyncio.sleep(TIMEOUT)
        beats = _beats(runtime.events)
        (error,) = runtime.of(ErrorObservation)

    # Both attempts were heard of while they waited, each within its own deadline.
    assert {beat.attempt for beat in beats} == {1, 2}
    assert all(beat.attempts == 2 and beat.timeout_seconds == TIMEOUT for beat in beats)
    assert all(0 < beat.elapsed_seconds < TIMEOUT for beat in beats)
    for attempt in (1, 2):
        waited = [b.elapsed_seconds for b in beats if b.attempt == attempt]
        assert len(waited) >= 2 and waited == sorted(waited)
    assert all(beat.id < error.id for beat in beats)
    assert error.code == "llm_timeout" and f"{TIMEOUT:g}s" in error.content  # type: ignore[attr-defined]
    assert agent_states(runtime)[-1] == (AgentState.ERROR, "llm_timeout")
    assert statuses(runtime)[-1] == (ConversationStatus.ERROR, "llm_timeout")
    assert not runtime.of(LLMMetrics)  # nothing was answered, so nothing was paid

    (stop,) = [
        e
        for e in stopped.of(ConversationStatusChanged)
        if e.status == ConversationStatus.STOPPED  # type: ignore[attr-defined]
    ]
    assert _beats(stopped.events) and all(b.id < stop.id for b in _beats(stopped.events))
    assert not stopped.of(ErrorObservation)
    assert statuses(stopped)[-1][0] == ConversationStatus.STOPPED


async def test_a_retry_after_the_deadline_continues_and_heartbeats_stay_out_of_the_prompt(
    tmp_path: Path,
) -> None:
    script = {"steps": [{**think("late but fine"), "delay": {**HANG, "times": 1}}, finish()]}
    spec = ConversationSpec(initial_user_msg="Hi.")
    async with (
        agent_stack(tmp_path, script, **TINY) as stack,
        stack.conversation("ivan", spec) as runtime,
    ):
        await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
        beats = _beats(runtime.events)
        answered = [r.body["messages"] for r in stack.llm.player.requests]

    assert beats and {beat.attempt for beat in beats} == {1}
    assert not runtime.of(ErrorObservation)
    assert len(runtime.of(LLMMetrics)) == 2
    # The second step's prompt is the first step's plus its answer: no heartbeat in it.
    assert len(answered[1]) == len(answered[0]) + 2
