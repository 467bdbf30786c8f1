"""CPU per call of litellm alone: requests a session-manager sent, replayed one at a time.

    uv run python bench/litellm_alone.py --url URL --requests FILE [--warm-up 20]

FILE is a JSON list of chat-completion request bodies (what the scripted model recorded), URL
the OpenAI base URL of a model that answers them. Each is sent through `litellm.acompletion`
as the session-manager sends it (`openai/` model, priced, no retries), one after another, so
the process's CPU per call is litellm's own (the model runs elsewhere). After `--warm-up`
calls (imports, first connections), prints `cpu_ms_per_call=<ms>`.

throughput.py runs it beside its tasks: every LLM call of a task pays this on the
session-manager's one event loop, so 1000 / (ms per call x calls per task) is the most tasks a
second a session-manager process could run if it did nothing but call litellm.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import msgspec

MODEL = "openai/scripted"


async def replay(url: str, requests: list[dict[str, Any]], warm_up: int) -> float:
    """Milliseconds of this process's CPU per call, after the first `warm_up` calls."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.register_model(
        {
            MODEL: {
                "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6,
                "litellm_provider": "openai",
                "mode": "chat",
            }
        }
    )
    if len(requests) <= warm_up:
        raise ValueError(f"{len(requests)} requests leave none to measure after the warm-up")
    started = 0.0
    for n, body in enumerate(requests):
        if n == warm_up:
            started = time.process_time()
        await litellm.acompletion(
            model=MODEL,
            api_base=url,
            api_key="scripted-model-needs-no-key",
            messages=body["messages"],
            tools=body.get("tools"),
            timeout=60,
            max_retries=0,
        )
    await asyncio.sleep(0.2)  # litellm's success logging runs after the call returns
    return (time.process_time() - started) * 1000 / (len(requests) - warm_up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--warm-up", type=int, default=20)
    options = parser.parse_args()
    requests = msgspec.json.decode(options.requests.read_bytes(), type=list[dict[str, Any]])
    cpu_ms = asyncio.run(replay(options.url, requests, options.warm_up))
    print(f"cpu_ms_per_call={cpu_ms:.3f}")


if __name__ == "__main__":
    main()
