"""The runtime-runner's Prometheus metrics: its live sandboxes and the actions it runs."""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

SANDBOXES_LIVE = Gauge("taskbus_sandboxes_live", "Sandboxes this runner holds now")
ACTIONS = Histogram(
    "taskbus_runner_action_seconds",
    "How long each action took to run and answer, by event kind and outcome",
    ["kind", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
