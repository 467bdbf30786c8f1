"""Metrics, traces, logs and readiness of the real stack (`taskbus up` as processes), after one
task run through the public API.

The cross-service trace is read from the files each process's own exporter writes
(`TASKBUS_TRACES_DIR`): spans from three separate processes joined only by the context in NATS
headers, so no shared in-process context could fake the chain. The in-memory exporter test at
the end shows the same propagation through the appender and a consumer, in one process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import EventSource, MessageAction
from taskbus.contracts.observability import (
    ObservabilitySettings,
    consuming,
    span,
    tracer_provider,
)
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer

from ..conftest import Stack, running_stack
from ..public_api import events_until_final, metrics_texts, open_events_ws

pytestmark = pytest.mark.slow

TASK = "Plan with the task tracker, create hello.txt, write a README.md, then finish."
CID = "0123456789abcdef0123456789abcdef"
SERVICES = ("session_manager", "runtime_runner", "event_store")


class Run(msgspec.Struct, kw_only=True):
    stack: Stack
    conversation_id: str
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    websockets_while_open: float


def samples(text: str) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value}."""
    parsed = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            parsed[name] = float(value)
    return parsed


def total(metrics: dict[str, float], name: str) -> float:
    """The sum of a metric over its label sets."""
    return sum(v for k, v in metrics.items() if re.fullmatch(rf"{name}(\{{.*\}})?", k))


async def health(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/api/health")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def scrape_all(client: httpx.AsyncClient) -> dict[str, dict[str, float]]:
    return {process: samples(text) for process, text in (await metrics_texts(client)).items()}


async def until(check: Any) -> None:
    """Poll `check` until it is true (the caller bounds it, generously: CI is loaded)."""
    while True:
        if await check():
            return
        await asyncio.sleep(0.25)


@pytest.fixture(scope="module")
def traces_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="module")
def observed_stack(tmp_path_factory: pytest.TempPathFactory, traces_dir: Path) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("observed"),
        TASKBUS_TRACES_DIR=str(traces_dir),
        # Every line the services write while handling the task; LiteLLM's stay at WARNING.
        TASKBUS_LOG_LEVEL="DEBUG",
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
async def run(observed_stack: Stack) -> AsyncIterator[Run]:
    """One task to FINISHED, with every process's metrics scraped before and after."""
    async with observed_stack.client() as client:

        async def all_ready() -> bool:
            return bool((await health(client))["ready"])

        async with asyncio.timeout(60):
            await until(all_ready)
        before = await scrape_all(client)
        created = await client.post("/api/conversations", json={"initial_user_msg": TASK})
        assert created.status_code == 201, created.text
        cid = created.json()["conversation_id"]
        async with open_events_ws(observed_stack, cid, -1) as ws:
            open_gauge = total(
                samples((await client.get("/metrics")).text), "taskbus_websocket_clients"
            )
            events = await events_until_final(ws)
        assert events[-1]["status"] == "FINISHED", events[-1]

        async def websocket_closed() -> bool:
            """The server sees the close a moment after the client has sent it."""
            metrics = samples((await client.get("/metrics")).text)
            return total(metrics, "taskbus_websocket_clients") == 0

        async with asyncio.timeout(30):
            await until(websocket_closed)
        after = await scrape_all(client)
        yield Run(
            stack=observed_stack,
            conversation_id=cid,
            before=before,
            after=after,
            websockets_while_open=open_gauge,
        )


async def test_metrics_move_with_a_task(run: Run) -> None:
    def moved(service: str, name: str) -> float:
        return total(run.after[service], name) - total(run.before[service], name)

    # Both writers of the log count what they appended.
    assert moved("session_manager", "taskbus_events_appended_total") >= 5
    assert moved("runtime_runner", "taskbus_events_appended_total") >= 2
    assert moved("session_manager", "taskbus_llm_latency_seconds_count") >= 2
    assert moved("session_manager", "taskbus_llm_cost_usd_total") > 0
    assert moved("runtime_runner", "taskbus_runner_action_seconds_count") >= 2
    assert run.websockets_while_open == 1  # and 0 once closed: `run` waits for that
    # Sampled lag of the consumers each process holds (gauges exist, nothing left behind).
    for service in SERVICES:
        lag = {k: v for k, v in run.after[service].items() if k.startswith("taskbus_consumer_")}
        assert lag, service
    # No label carries a conversation id (the registry would grow without bound).
    for metrics in run.after.values():
        assert [name for name in metrics if run.conversation_id in name] == []


def read_spans(traces_dir: Path) -> list[dict[str, Any]]:
    spans = []
    for path in traces_dir.glob("*.jsonl"):
        spans += [json.loads(line) for line in path.read_text().splitlines() if line]
    return spans


async def test_one_trace_spans_gateway_session_manager_and_runner(
    run: Run, traces_dir: Path
) -> None:
    spans = read_spans(traces_dir)
    [create] = [
        s for s in spans
        if s["name"] == "POST /api/conversations"
        and s["resource"]["attributes"]["service.name"] == "taskbus-gateway"
    ]  # fmt: skip
    trace_id = create["context"]["trace_id"]
    in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
    by_id = {s["context"]["span_id"]: s for s in in_trace}
    services = {s["resource"]["attributes"]["service.name"] for s in in_trace}
    assert {"taskbus-gateway", "taskbus-session-manager", "taskbus-runtime-runner"} <= services

    def lineage(s: dict[str, Any]) -> list[dict[str, Any]]:
        """`s` and its ancestors, up to the trace's root."""
        chain = [s]
        while chain[-1]["parent_id"] in by_id:
            chain.append(by_id[chain[-1]["parent_id"]])
        return chain

    def ancestry(s: dict[str, Any]) -> list[str]:
        return [a["resource"]["attributes"]["service.name"] for a in lineage(s)]

    # A sandbox command's span descends, through session-manager, from the gateway request;
    # and the LLM call after its observation descends from the command ("and back").
    commands = [s for s in in_trace if s["name"] == "sandbox CmdRunAction"]
    assert commands
    chain = ancestry(commands[0])
    assert chain[0] == "taskbus-runtime-runner" and chain[-1] == "taskbus-gateway", chain
    assert "taskbus-session-manager" in chain
    command_ids = {c["context"]["span_id"] for c in commands}
    llm_calls = [s for s in in_trace if s["name"] == "llm completion"]

    def descends_from_a_command(s: dict[str, Any]) -> bool:
        return any(a["context"]["span_id"] in command_ids for a in lineage(s))

    assert any(descends_from_a_command(call) for call in llm_calls)


async def test_log_lines_are_json_with_service_conversation_and_trace(run: Run) -> None:
    logs = run.stack.data_dir / "logs"
    named = 0
    for service, file in (
        ("session_manager", "session-manager.log"),
        ("runtime_runner", "runtime-runner.log"),
        ("event_store", "event-store.log"),
        ("gateway", "gateway.log"),
    ):
        for raw in (logs / file).read_text().splitlines():
            line = json.loads(raw)  # every line: nothing printed around the formatter
            assert line["service"] == service, line
            assert {"conversation_id", "trace_id", "level", "message"} <= line.keys()
            if line["logger"].startswith("LiteLLM"):  # quiet at the default level
                assert line["level"] in ("WARNING", "ERROR", "CRITICAL"), line
            if line["conversation_id"] == run.conversation_id:
                assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"] or ""), line
                named += 1
    assert named >= 1  # the agent's lines say which conversation they are about


async def test_health_lists_every_service_and_a_killed_one_goes_not_ready(run: Run) -> None:
    async with run.stack.client() as client:
        body = await health(client)
        assert body["ready"] is True
        assert set(SERVICES) <= body["services"].keys()
        for service in SERVICES:
            assert body["services"][service]["ready"], (service, body["services"][service])
        pid = int((run.stack.data_dir / "pids" / "event-store.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # no goodbye: only the missing heartbeat tells

        async def killed_not_ready() -> bool:
            instances = (await health(client))["services"]["event_store"]["instances"]
            return any(i["pid"] == pid and not i["ready"] for i in instances)

        async with asyncio.timeout(45):
            await until(killed_not_ready)


async def test_trace_context_rides_the_appender_to_a_consumer(tmp_path: Path) -> None:
    """In one process with an in-memory exporter: an event appended inside a span is consumed
    in a span of the same trace, child of the appending one."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with NatsServer(tmp_path / "nats") as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            subscription = await nc.subscribe(subjects.ALL_EVENTS)
            # The process-wide provider, as a service's `setup` sets it (settable once).
            trace.set_tracer_provider(provider)
            assert trace.get_tracer_provider() is provider
            with tracer.start_as_current_span("append") as appending:
                await EventAppender(js).append(
                    MessageAction(conversation_id=CID, source=EventSource.USER, content="hi")
                )
            message = await subscription.next_msg(timeout=5)
            with consuming(message.subject, message.headers, CID), span("work"):
                pass
        finally:
            await nc.close()
            exporter.shutdown()  # later spans of this worker are not kept
    finished = {s.name: s for s in exporter.get_finished_spans()}
    consumed = finished[f"{subjects.family(message.subject)} process"]
    assert consumed.context.trace_id == appending.get_span_context().trace_id
    assert consumed.parent is not None
    assert consumed.parent.span_id == appending.get_span_context().span_id
    assert finished["work"].parent.span_id == consumed.context.span_id  # type: ignore[union-attr]


def test_a_process_records_spans_only_if_it_exports_them_and_then_whatever_its_caller_did(
    tmp_path: Path,
) -> None:
    """One that exports nothing records nothing (its spans only carry the ids on); one that
    exports records its part of a trace even when the caller's process recorded none."""
    silent = tracer_provider("gateway", ObservabilitySettings()).get_tracer("test")
    with silent.start_as_current_span("post") as posting:
        assert not posting.is_recording()
        assert posting.get_span_context().is_valid  # the logs' and the next service's ids
        headers: dict[str, str] = {}
        propagate.inject(headers)
    settings = ObservabilitySettings(traces_dir=str(tmp_path))
    exporting = tracer_provider("session_manager", settings)
    with exporting.get_tracer("test").start_as_current_span(
        "handle", context=propagate.extract(headers)
    ) as handling:
        assert handling.is_recording()
    exporting.shutdown()
    (written,) = tmp_path.glob("session_manager-*.jsonl")
    (recorded,) = [json.loads(line) for line in written.read_text().splitlines()]
    assert recorded["name"] == "handle"
    assert recorded["context"]["trace_id"] == f"0x{posting.get_span_context().trace_id:032x}"
