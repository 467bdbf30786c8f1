"""The scripted model, reached over HTTP through real litellm as an `openai/...` model."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from taskbus.devtools.scripted_llm import (
    EXHAUSTED_MESSAGE,
    MODEL_NAME,
    ScriptedLLM,
    ScriptPlayer,
    load_script,
    step_of,
)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm  # after the cost-map switch; imported once per process
from litellm.exceptions import AuthenticationError, RateLimitError, ServiceUnavailableError

INPUT_PRICE = 2e-6
OUTPUT_PRICE = 8e-6
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "execute_bash",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module", autouse=True)
def scripted_prices() -> None:
    """Prices are litellm-global: set them for this module, whatever other modules set."""
    litellm.register_model(
        {
            "openai/scripted": {
                "input_cost_per_token": INPUT_PRICE,
                "output_cost_per_token": OUTPUT_PRICE,
                "litellm_provider": "openai",
                "mode": "chat",
                "max_tokens": 4096,
                "max_input_tokens": 128_000,
            }
        }
    )


@pytest.fixture(scope="module")
def demo_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


async def _complete(url: str, messages: list[dict[str, Any]]) -> Any:
    return await litellm.acompletion(
        model="openai/scripted",
        api_base=url,
        api_key="scripted",
        messages=messages,
        tools=TOOLS,
        max_retries=0,
    )


def _assistant_turn(call_id: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "x", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "ok"},
    ]


async def test_first_step_is_a_plan_priced_by_litellm(demo_llm: ScriptedLLM) -> None:
    response = await _complete(demo_llm.url, [{"role": "user", "content": "do the demo"}])
    call = response.choices[0].message.tool_calls[0]
    assert call.function.name == "task_tracker"
    plan = json.loads(call.function.arguments)
    assert plan["command"] == "plan"
    assert [item["status"] for item in plan["task_list"]] == ["todo", "todo", "todo"]
    assert response.choices[0].finish_reason == "tool_calls"
    assert response.system_fingerprint == "taskbus-scripted-model"
    usage = response.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0
    expected = usage.prompt_tokens * INPUT_PRICE + usage.completion_tokens * OUTPUT_PRICE
    assert litellm.completion_cost(response) == pytest.approx(expected, rel=1e-9)
    assert response._hidden_params["response_cost"] == pytest.approx(expected, rel=1e-9)


async def test_step_played_is_the_number_of_assistant_messages(demo_llm: ScriptedLLM) -> None:
    history = [{"role": "user", "content": "do the demo"}, *_assistant_turn("a")]
    second = await _complete(demo_llm.url, history)
    call = second.choices[0].message.tool_calls[0]
    assert call.function.name == "execute_bash"
    assert json.loads(call.function.arguments) == {"command": "echo hello > hello.txt && ls"}
    # The same request gives the same answer: no hidden conversation state.
    again = await _complete(demo_llm.url, history)
    assert again.choices[0].message.tool_calls[0].id == call.id
    assert again.usage.prompt_tokens == second.usage.prompt_tokens


async def test_demo_script_ends_with_finish_then_says_it_is_exhausted(
    demo_llm: ScriptedLLM,
) -> None:
    history: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    names = []
    for step in range(6):
        response = await _complete(demo_llm.url, history)
        names.append(response.choices[0].message.tool_calls[0].function.name)
        history += _assistant_turn(f"c{step}")
    assert names == [
        "task_tracker",
        "execute_bash",
        "task_tracker",
        "str_replace_editor",
        "task_tracker",
        "finish",
    ]
    last = await _complete(demo_llm.url, history)
    assert last.choices[0].message.content == EXHAUSTED_MESSAGE
    assert last.choices[0].message.tool_calls is None


async def test_scripted_errors_fail_n_times_then_answer() -> None:
    script = {
        "steps": [
            {"error": {"status": 429, "times": 2}, "content": "after two rate limits"},
            {"error": {"status": 401}, "content": "never"},
        ]
    }
    with ScriptedLLM(script) as server:
        first = [{"role": "user", "content": "hi"}]
        for _ in range(2):
            with pytest.raises(RateLimitError):
                await _complete(server.url, first)
        answered = await _complete(server.url, first)
        assert answered.choices[0].message.content == "after two rate limits"
        # Another conversation at the same step has its own attempt counter.
        with pytest.raises(RateLimitError):
            await _complete(server.url, [{"role": "user", "content": "other"}])
        with pytest.raises(AuthenticationError):
            await _complete(server.url, [*first, {"role": "assistant", "content": "x"}])


async def test_unavailable_maps_to_litellm_service_unavailable() -> None:
    with ScriptedLLM({"steps": [{"error": {"status": 503, "times": 1}, "content": "up"}]}) as s:
        with pytest.raises(ServiceUnavailableError):
            await _complete(s.url, [{"role": "user", "content": "hi"}])
        ok = await _complete(s.url, [{"role": "user", "content": "hi"}])
        assert ok.model.endswith(MODEL_NAME)


def test_player_rejects_streaming_and_bad_messages() -> None:
    player = ScriptPlayer(load_script())
    assert player.answer({"messages": "nope"})[0] == 400
    assert player.answer({"messages": [], "stream": True})[0] == 400


def test_unknown_script_fields_are_rejected() -> None:
    with pytest.raises(Exception, match="unknown field"):
        load_script({"steps": [{"contnet": "typo"}]})


def test_step_follows_the_last_scripted_call_id_so_a_condensed_history_continues() -> None:
    full = [{"role": "user", "content": "go"}]
    for step in range(4):
        full += _assistant_turn(f"call_s{step}_0")
    assert step_of(full) == 4
    condensed = [full[0], {"role": "user", "content": "summary"}, *full[-4:]]
    assert step_of(condensed) == 4  # two assistant messages left, but the ids say step 3 was last
    with_reply = [*condensed, {"role": "assistant", "content": "a question"}]
    assert step_of(with_reply) == 5
    assert step_of([full[0], *_assistant_turn("foreign"), *_assistant_turn("x")]) == 2


async def test_pinned_usage_prices_every_call_exactly_and_requests_are_logged() -> None:
    litellm.register_model(
        {
            "openai/scripted-pinned": {
                "input_cost_per_token": 2e-4,
                "output_cost_per_token": 4e-4,
                "litellm_provider": "openai",
                "mode": "chat",
            }
        }
    )
    usage = {"prompt_tokens": 1000, "completion_tokens": 500}
    with ScriptedLLM({"steps": [{"content": "a", "usage": usage}]}) as server:
        response = await litellm.acompletion(
            model="openai/scripted-pinned",
            api_base=server.url,
            api_key="sk-test-key",
            messages=[{"role": "user", "content": "hi"}],
            max_retries=0,
        )
        (logged,) = server.player.requests
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (1000, 500)
    assert response.model == "scripted-pinned"  # priced under the model asked for
    assert litellm.completion_cost(response) == pytest.approx(0.4, rel=1e-12)
    assert (logged.step, logged.status, logged.authorization) == (0, 200, "Bearer sk-test-key")
    assert logged.body["messages"] == [{"role": "user", "content": "hi"}]
    assert logged.response["usage"]["prompt_tokens"] == 1000


async def test_an_auth_failure_echoes_the_key_it_got_like_a_careless_provider() -> None:
    with ScriptedLLM({"steps": [{"error": {"status": 401}}]}) as server:
        with pytest.raises(AuthenticationError, match="sk-echoed"):
            await litellm.acompletion(
                model="openai/scripted",
                api_base=server.url,
                api_key="sk-echoed",
                messages=[{"role": "user", "content": "hi"}],
                max_retries=0,
            )
        assert [r.status for r in server.player.requests] == [401]


def test_a_delayed_step_hangs_its_first_attempts_until_released() -> None:
    """`delay` holds the first `times` attempts of a request (a model that accepts and hangs);
    later attempts are answered at once, and stopping the server lets held ones go."""
    player = ScriptPlayer(
        load_script({"steps": [{"content": "late", "delay": {"seconds": 3600, "times": 1}}]})
    )
    request = {"messages": [{"role": "user", "content": "hi"}]}
    answers: list[tuple[int, dict[str, Any]]] = []
    held = threading.Thread(target=lambda: answers.append(player.answer(request)))
    held.start()
    held.join(timeout=0.5)
    assert held.is_alive() and not answers  # still waiting on its hour
    second = threading.Thread(target=lambda: answers.append(player.answer(request)))
    second.start()
    second.join(timeout=30)
    assert not second.is_alive()
    assert answers[0][1]["choices"][0]["message"]["content"] == "late"
    player.release()
    held.join(timeout=30)
    assert not held.is_alive() and len(answers) == 2
