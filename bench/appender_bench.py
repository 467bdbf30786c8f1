"""The appender beside raw JetStream publish (issue 13, item 4), in the same run.

    uv run python bench/appender_bench.py [--conversations 50] [--appends 200]

`--conversations` writers at once, each appending `--appends` events to its own conversation
one after another (as a session-manager's conversations do), through `EventAppender.append`;
the reference is raw `js.publish` of the same payloads on the same subjects, awaited one after
another per writer, on the same connection and server. Rounds are interleaved so drift on a
shared machine hits both alike; the ratio is the median of the rounds' ratios.
Target: appender >= 0.8x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import nats
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import EventSource, ThinkAction, encode_event
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer

TARGET_RATIO = 0.8
ROUNDS = 5


def thought(cid: str, writer: int, n: int) -> ThinkAction:
    return ThinkAction(
        conversation_id=cid, source=EventSource.AGENT, thought=f"writer {writer} step {n} " * 8
    )


async def raw_rate(js: JetStreamContext, conversations: int, appends: int) -> float:
    """Events/s of awaited raw publishes, one writer per conversation, all writers at once."""
    cids = [uuid.uuid4().hex for _ in range(conversations)]

    async def write(w: int) -> None:
        for n in range(appends):
            event = thought(cids[w], w, n)
            await js.publish(subjects.event_subject(cids[w], event.kind), encode_event(event))

    started = time.perf_counter()
    await asyncio.gather(*(write(w) for w in range(conversations)))
    return conversations * appends / (time.perf_counter() - started)


async def appender_rate(js: JetStreamContext, conversations: int, appends: int) -> float:
    """Events/s of `EventAppender.append`, as `raw_rate` writes them."""
    appender = EventAppender(js)
    cids = [uuid.uuid4().hex for _ in range(conversations)]

    async def write(w: int) -> None:
        for n in range(appends):
            await appender.append(thought(cids[w], w, n))

    started = time.perf_counter()
    await asyncio.gather(*(write(w) for w in range(conversations)))
    return conversations * appends / (time.perf_counter() - started)


async def main(conversations: int, count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await ensure_streams(js)
        await raw_rate(js, conversations, count // 4)  # warm-up
        await appender_rate(js, conversations, count // 4)
        raw, appended = [], []
        for _ in range(ROUNDS):
            raw.append(await raw_rate(js, conversations, count))
            appended.append(await appender_rate(js, conversations, count))
        await nc.drain()
    ratio = statistics.median(a / r for a, r in zip(appended, raw, strict=True))
    print(f"Appends: {conversations} conversations x {count} events, median of {ROUNDS} rounds")
    print(f"{'':28}{'events/s':>10}{'ratio':>8}{'target':>9}")
    print(f"{'raw js.publish (reference)':28}{statistics.median(raw):>10.0f}{1.0:>8.2f}")
    print(
        f"{'EventAppender.append':28}{statistics.median(appended):>10.0f}{ratio:>8.2f}"
        f"{f'>= {TARGET_RATIO:.2f}':>9}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--appends", type=int, default=200)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.conversations, arguments.appends))
