"""Agent steps per second at 1, 2 and 3 session-manager instances (issue 11, acceptance 3).

    uv run python bench/scale.py [--instances 1 2 3] [--runners 1] [--conversations 150]
                                 [--steps 6] [--latency 1.0] [--nats-nodes 1]

Each run is a fresh cluster (devtools.cluster_stack: the services as processes, the local
backend under bubblewrap) with a scripted model answering every call after `--latency` seconds.
All conversations are created at once and may all run at once, so with a 1 s model the work
waiting at any moment is far more than one session-manager gets through: what one instance
processes per step (fold, decide, the litellm call, appends) is the limit, not the model.

Each conversation takes `--steps` agent steps: `think` and `execute_bash true` in turn, then
finish. From the log (the stream's own store times):
- steps/s: agent steps (LLMMetrics) stored between the first and the last one, per second;
- per-step overhead: a step's span (from the event completing the previous step, or the
  runtime being ready, to the event completing this one: the observation of its command, else
  its action) minus the model's latency (LLMMetrics.latency_ms). The command is `true`, so what
  is left is the services' time: consuming, deciding, appending, the runner's dispatch.
Each figure is printed beside the first run's (the reference, 1 instance).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec

from taskbus.contracts.events import AgentFinishAction, LLMMetrics, UnknownEvent
from taskbus.devtools.cluster_stack import (
    Cluster,
    ClusterSettings,
    StoredEvents,
    cpu_seconds,
    running_cluster,
)

TASK = "Think, run `true`, and so on, then finish."
RUN_SECONDS = 900


class Figures(msgspec.Struct, frozen=True):
    steps: int
    steps_per_second: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    # CPU cores each kind of process used on average over the run (where the machine's go).
    cores: dict[str, float] = {}


def script(steps: int, latency: float) -> dict[str, Any]:
    calls = [
        {"name": "think", "arguments": {"thought": f"Step {i}."}}
        if i % 2 == 0
        else {"name": "execute_bash", "arguments": {"command": "true"}}
        for i in range(steps - 1)
    ]
    finish = {"name": "finish", "arguments": {"message": "Done."}}
    return {
        "description": "bench/scale.py: think and `true` in turn, then finish.",
        "latency_seconds": latency,
        "steps": [{"tool_calls": [call]} for call in [*calls, finish]],
    }


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def step_figures(stored: StoredEvents, conversation_ids: list[str]) -> Figures:
    step_times: list[float] = []
    overheads: list[float] = []
    for cid in conversation_ids:
        events, stored_at = stored.events[cid], stored.stored_at[cid]
        at = {event.id: when.timestamp() for event, when in zip(events, stored_at, strict=True)}
        metrics = [e for e in events if isinstance(e, LLMMetrics)]
        # A step's action follows its LLMMetrics; it is complete once its answer is stored.
        answered = {
            e.cause: e.id
            for e in events
            if not isinstance(e, UnknownEvent)
            and e.cause is not None
            and e.kind.endswith("Observation")
        }
        actions = [
            e
            for e in events
            if not isinstance(e, UnknownEvent | LLMMetrics)
            and e.source == "agent"
            and e.kind.endswith("Action")
        ]
        if not metrics or len(actions) != len(metrics):
            raise AssertionError(f"{cid}: {len(metrics)} steps, {len(actions)} actions")
        # The first step starts when the event before its own first one was stored.
        previous_end = at[min(metrics[0].id, actions[0].id) - 1]
        for metric, action in zip(metrics, actions, strict=True):
            end = at[answered.get(action.id, action.id)]
            overheads.append(end - previous_end - metric.latency_ms / 1000)
            step_times.append(at[metric.id])
            previous_end = end
        if not isinstance(actions[-1], AgentFinishAction):
            raise AssertionError(f"{cid} did not finish: {actions[-1].kind}")
    step_times.sort()
    overheads.sort()
    window = step_times[-1] - step_times[0]
    return Figures(
        steps=len(step_times),
        steps_per_second=(len(step_times) - 1) / window,
        overhead_p50_ms=statistics.median(overheads) * 1000,
        overhead_p99_ms=percentile(overheads, 0.99) * 1000,
    )


async def measure(instances: int, runners: int, options: argparse.Namespace) -> Figures:
    concurrent = str(options.conversations)
    settings = ClusterSettings(
        nats_nodes=options.nats_nodes,
        session_managers=instances,
        runners=runners,
        gateways=1,
        script=script(options.steps, options.latency),
        settings={
            "TASKBUS_MAX_RUNNING": concurrent,
            "TASKBUS_MAX_CONCURRENT_CONVERSATIONS": concurrent,
            "TASKBUS_MAX_CONCURRENT_CONVERSATIONS_LIMIT": concurrent,
            "TASKBUS_CONCURRENCY_POLICY": "queue",
            "TASKBUS_MAX_QUEUED_CONVERSATIONS": concurrent,
            "TASKBUS_CREATE_BURST": concurrent,
            "TASKBUS_CREATE_RATE_PER_MINUTE": "100000",
            "TASKBUS_MAX_ITERATIONS": str(options.steps + 5),
        },
    )
    data_dir = Path(tempfile.mkdtemp(prefix="taskbus-scale-"))
    async with running_cluster(data_dir, settings) as cluster:
        nc = await cluster.admin()
        stored = StoredEvents()
        await stored.follow(nc)
        before = cpu_by_kind(cluster)
        started = time.monotonic()
        conversation_ids = await cluster.create_conversations(options.conversations, TASK)
        await stored.until_ended(conversation_ids, RUN_SECONDS)
        wall = time.monotonic() - started
        after = cpu_by_kind(cluster)
        await nc.close()
    cores = {kind: (after[kind] - before.get(kind, 0.0)) / wall for kind in after}
    figures = msgspec.structs.replace(step_figures(stored, conversation_ids), cores=cores)
    used = ", ".join(f"{kind} {share:.2f}" for kind, share in sorted(cores.items()))
    print(f"  {instances} SM, {runners} runner(s): {figures.steps} steps, wall {wall:.1f} s")
    print(f"    CPU cores used (of {os.cpu_count()}): {used}, total {sum(cores.values()):.2f}")
    return figures


def cpu_by_kind(cluster: Cluster) -> dict[str, float]:
    """CPU seconds so far of each kind of process (all session-managers together, ...)."""
    used: dict[str, float] = defaultdict(float)
    for name, process in cluster.processes.items():
        used[name.rstrip("0123456789")] += cpu_seconds(process.pid)
    for node in cluster.nodes:
        used["nats"] += cpu_seconds(node.pid)
    return used


def row(label: str, figures: Figures, reference: Figures) -> str:
    speedup = figures.steps_per_second / reference.steps_per_second
    return (
        f"{label:<22} {figures.steps_per_second:8.1f} ({speedup:4.2f}x) "
        f"{figures.overhead_p50_ms:10.0f} (ref {reference.overhead_p50_ms:5.0f}) "
        f"{figures.overhead_p99_ms:10.0f} (ref {reference.overhead_p99_ms:5.0f})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runners", type=int, nargs="+", default=[1])
    parser.add_argument("--conversations", type=int, default=150)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--nats-nodes", type=int, choices=(1, 3), default=1)
    options = parser.parse_args()
    print(
        f"{options.conversations} conversations at once, {options.steps} steps each, "
        f"model latency {options.latency:.1f} s, {options.nats_nodes} NATS node(s)"
    )
    results: list[tuple[str, Figures]] = []
    for runners in options.runners:
        for instances in options.instances:
            label = f"{instances} SM, {runners} runner(s)"
            results.append((label, await measure(instances, runners, options)))
    reference = results[0][1]
    print(f"\n{'':<22} {'steps/s (vs ref)':>17} {'overhead p50 ms':>22} {'p99 ms':>21}")
    for label, figures in results:
        print(row(label, figures, reference))


if __name__ == "__main__":
    asyncio.run(main())
