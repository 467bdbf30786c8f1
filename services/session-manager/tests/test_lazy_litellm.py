"""litellm costs seconds of CPU and a few hundred MB to import: session-manager starts without it
and imports it on its first LLM call, in a worker thread, so other conversations keep moving.

In a fresh interpreter (this one has litellm already): the import of the service does not load
it, and during the first completion the event loop never stalls for most of the call, as it
would if the import ran on it.
"""

from __future__ import annotations

import subprocess
import sys

_FIRST_CALL = """
import asyncio, sys, time
import taskbus.session_manager.app
from taskbus.devtools.scripted_llm import ScriptedLLM
from taskbus.session_manager.llm import LLM
from taskbus.session_manager.settings import SessionManagerSettings

print("loaded at start:", "litellm" in sys.modules)

async def first_call(url):
    llm = LLM(SessionManagerSettings(llm_base_url=url, llm_api_key="scripted"))
    longest, ticking = 0.0, True

    async def tick():
        nonlocal longest
        last = time.monotonic()
        while ticking:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest, last = max(longest, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)  # ticking before the call starts
    started = time.monotonic()
    messages = [{"role": "user", "content": "Hi."}]
    await llm.complete(llm.config_for("u", None), messages, [])
    took = time.monotonic() - started
    ticking = False
    await ticker
    print(f"longest stall {longest:.3f} of {took:.3f}")
    print("stalled for most of it:", longest > took / 2)

with ScriptedLLM({"steps": [{"content": "Hello."}]}) as server:
    asyncio.run(first_call(server.url))
"""


def test_litellm_is_imported_on_the_first_call_off_the_event_loop() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "loaded at start: False" in lines
    assert "stalled for most of it: False" in lines, lines
