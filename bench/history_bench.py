"""History-length benchmark: session-manager's fold and reload of a long conversation against a
short one.

    uv run python bench/history_bench.py [--events 100000] [--runs 21] [--every N]

1. Fold: `state.fold` per event at 1,000 and at N events (in memory): flat if applying an event
   costs O(1) whatever the history behind it.
2. Reload: session-manager's load path (`Conversations.load`: snapshot + the log's tail, or
   the whole log) of an N-event and a 100-event conversation, in-process against a real
   nats-server. The N-event log is consumed first as the events consumer does
   (`Conversations.observe`), which writes the snapshots every `snapshot_every_events`; the
   tail a load reads is printed, first right after a snapshot, then with the longest tail
   (`snapshot_every_events` - 1 events appended since; N is rounded down to a multiple of the
   interval so the log ends on a snapshot). Reference: the whole log read and folded.
3. What the snapshots cost: consuming the log with them against without (same run), and one
   snapshot's size and KV put.
Target (issue 13): the N-event reload within 1.2x of the short one.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.events import (
    Event,
    encode_event,
)
from taskbus.contracts.streams import ensure_streams, last_message
from taskbus.devtools.agent_log import agent_events
from taskbus.devtools.bench_report import (
    interleaved_median_seconds,
    median_seconds,
    print_table,
)
from taskbus.devtools.nats_server import NatsServer
from taskbus.session_manager import log, snapshots
from taskbus.session_manager.conversations import Conversations
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.snapshots import SnapshotStore, encode_snapshot
from taskbus.session_manager.state import fold

SMALL = 100
TARGET = 1.2


class _Id(msgspec.Struct):
    id: int


async def publish(js: JetStreamContext, nc: Client, events: list[Event]) -> None:
    """Into the log at full speed (core publishes the stream captures), then wait for all."""
    cid = events[0].conversation_id
    for event in events:
        await nc.publish(subjects.event_subject(cid, event.kind), encode_event(event))
    await nc.flush()
    while True:
        last = await last_message(js, subjects.conversation_events(cid))
        data = last.data if last is not None else None
        if data is not None and msgspec.json.decode(data, type=_Id).id == events[-1].id:
            return
        await asyncio.sleep(0.05)


def fold_rate(events: list[Event]) -> float:
    """Microseconds per event folding `events` (best of 3)."""
    best = min(_fold_time(events) for _ in range(3))
    return best / len(events) * 1e6


def _fold_time(events: list[Event]) -> float:
    started = time.perf_counter()
    fold(events[0].conversation_id, events)
    return time.perf_counter() - started


async def consume(js: JetStreamContext, cid: str, every: int) -> float:
    """Seconds to deliver the log to a fresh `Conversations` as the events consumer does,
    writing a snapshot every `every` events."""
    live = Conversations(js, lambda _: None, snapshot_every=every)
    events = await log.read_events(js, cid)
    started = time.perf_counter()
    for sequence, event in events:
        await live.observe(event, sequence)
    return time.perf_counter() - started


async def main(total: int, runs: int, every: int) -> None:
    # The long log ends on a snapshot; `every - 1` more events after it: the longest tail.
    total -= total % every
    longest = agent_events("bench-big", total + every - 1)
    big, late = longest[:total], longest[total:]
    small = agent_events("bench-small", SMALL)
    per_1k, per_n = fold_rate(big[:1000]), fold_rate(big)
    rows = [
        ("fold, µs per event", f"{per_1k:.2f} (1,000 events)", f"{per_n:.2f}",
         f"{per_n / per_1k:.2f}x")
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await ensure_streams(js)
        print(f"publishing {total:,} + {SMALL} events ...", flush=True)
        await publish(js, nc, big)
        await publish(js, nc, small)

        print("consuming the long log as session-manager does, then without snapshots ...",
              flush=True)  # fmt: skip
        unsnapshotted = await consume(js, "bench-big", total + 1)
        consumed = await consume(js, "bench-big", every)
        store = SnapshotStore(js)
        found = await store.get("bench-big")
        assert found is not None and found[0].last_event_id == total - 1
        size = len(encode_snapshot(*found))
        put = await median_seconds(runs, lambda: store.put(*found))

        async def reload(cid: str) -> None:
            await Conversations(js, lambda _: None, snapshot_every=every).load(cid)

        print(f"reloading, {runs} runs each ...", flush=True)
        for _ in range(2):
            small_load, big_load = await interleaved_median_seconds(
                runs, lambda: reload("bench-small"), lambda: reload("bench-big")
            )
            loaded = await snapshots.load(js, store, "bench-big")
            whole = fold("bench-big", await log.read_conversation(js, "bench-big"))
            assert loaded.state == whole, "a reload from the snapshot differs from the full fold"
            rows.append(("reload (snapshot + tail)", f"{small_load * 1e3:.2f} ms",
                         f"{big_load * 1e3:.2f} ms (tail {loaded.read - 1})",
                         f"{big_load / small_load:.2f}x"))  # fmt: skip
            await publish(js, nc, late)  # then the longest tail
        started = time.perf_counter()
        fold("bench-big", await log.read_conversation(js, "bench-big"))
        full = time.perf_counter() - started
        rows.append(("  reference: whole log read + folded", "", f"{full * 1e3:.0f} ms",
                     f"{full / small_load:.0f}x"))  # fmt: skip
        rows.append((f"consume, µs per event (snapshot every {every})", "",
                     f"{consumed / total * 1e6:.1f}",
                     f"{consumed / unsnapshotted:.2f}x"))  # fmt: skip
        rows.append(("  reference: consume without snapshots", "",
                     f"{unsnapshotted / total * 1e6:.1f}", ""))  # fmt: skip
        rows.append(("snapshot: bytes, put", "", f"{size:,} B, {put * 1e3:.2f} ms", ""))
        await nc.drain()

    header = ("", f"{SMALL} events", f"{total:,} events", f"ratio (target ≤ {TARGET}x)")
    print_table(header, rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument(
        "--every",
        type=int,
        default=SessionManagerSettings().snapshot_every_events,
        help="snapshot interval (default: session-manager's TASKBUS_SNAPSHOT_EVERY_EVENTS)",
    )
    arguments = parser.parse_args()
    asyncio.run(main(arguments.events, arguments.runs, arguments.every))
