"""Session-manager's Prometheus metrics: the LLM calls' latency and cost, and the admission
queue. `endpoint` is `operator` or `user` (a user's own model): model names are the users' to
choose, so they are no label."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

from taskbus.contracts import subjects

LLM_LATENCY = Histogram(
    "taskbus_llm_latency_seconds",
    "Duration of each successful LLM completion (one attempt)",
    ["endpoint"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
)
LLM_COST = Counter("taskbus_llm_cost_usd", "LLM spend, as litellm prices it", ["endpoint"])
LLM_FAILURES = Counter(
    "taskbus_llm_failures", "LLM calls given up on, by error code", ["endpoint", "code"]
)
ADMISSION_QUEUE = Gauge(
    "taskbus_admission_queue",
    "QUEUED conversations of the partitions this instance holds (waiting for a slot)",
)


def endpoint(users: bool) -> str:
    return "user" if users else "operator"


def durables(partitions: frozenset[int]) -> Iterator[tuple[str, str]]:
    """The (stream, durable) pairs consumed here, for the consumer lag gauges."""
    yield subjects.COMMANDS_STREAM, subjects.SESSION_MANAGER_USER_COMMANDS_DURABLE
    for partition in sorted(partitions):
        yield subjects.EVENTS_STREAM, subjects.session_manager_events_durable(partition)
        yield subjects.COMMANDS_STREAM, subjects.session_manager_commands_durable(partition)
