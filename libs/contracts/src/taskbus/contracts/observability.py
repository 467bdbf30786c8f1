"""One logging and tracing setup for every service process (`setup`), and the trace context that
travels in NATS headers.

Logs are JSON lines on stderr (`TASKBUS_LOG_FORMAT=text` for humans), each with the service,
the conversation being handled (a contextvar the consumers set, `conversation`) and the
current OpenTelemetry trace id. Credentials are masked in every line (`RedactApiKeys`, on the
one handler, so no logger can bypass it). LiteLLM logs at WARNING and above only, through the
same handler: it installs a handler of its own at import, which printed each of its lines a
second time (`route_to_root` removes it).

Traces: FastAPI (0.165+) spans each gateway request itself once a provider is set, and
FastStream's middleware carries the context of what it publishes and consumes one by
one, but a batch consumer starts a new trace and raw nats-py publishes carry none. So every
raw publish adds `trace_headers()` and every consumer continues the trace of each message with
`consuming(message, ...)`: a task is one trace from the gateway request through session-manager
and the runner's sandbox command and back. The provider exports over OTLP when
`TASKBUS_OTLP_ENDPOINT` is set (and the exporter package is installed), as JSON lines into
`TASKBUS_TRACES_DIR` when that is set, and otherwise nowhere: trace ids still exist for logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import msgspec
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from taskbus.contracts import subjects
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.redaction import redact

# LiteLLM's loggers (litellm/_logging.py): one INFO line per call and more, unless asked for.
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")

_conversation: ContextVar[str | None] = ContextVar("taskbus_conversation_id", default=None)
_tracer = trace.get_tracer("taskbus")


class ObservabilitySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Read by every service from `TASKBUS_*` (one struct, shared, as the setup is)."""

    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    litellm_log_level: str = "WARNING"
    # An OTLP/HTTP collector (e.g. http://otel-collector:4318/v1/traces).
    otlp_endpoint: str | None = None
    # A directory each process writes its spans into (`<service>-<pid>.jsonl`): tests, debugging.
    traces_dir: str | None = None


def setup(service: str, settings: ObservabilitySettings | None = None) -> None:
    """Logging and tracing of this process, once, before anything logs; `service` names it."""
    settings = settings or settings_from_env(ObservabilitySettings)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactApiKeys())
    handler.addFilter(_Context(service))
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else _TEXT)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in LITELLM_LOGGERS:
        logging.getLogger(name).setLevel(settings.litellm_log_level.upper())
    trace.set_tracer_provider(tracer_provider(service, settings))


def route_to_root(*names: str) -> None:
    """Drop the handlers libraries add to their own loggers (LiteLLM does at import), so their
    lines pass the one handler `setup` installed, once, as JSON and redacted."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


# --- conversation and trace context ---------------------------------------------------------


@contextlib.contextmanager
def conversation(conversation_id: str | None) -> Iterator[None]:
    """Log lines (and tasks started) within this block name `conversation_id`."""
    token = _conversation.set(conversation_id)
    try:
        yield
    finally:
        _conversation.reset(token)


def current_conversation() -> str | None:
    return _conversation.get()


def trace_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """`headers` plus the current trace context (W3C `traceparent`), for a raw nats-py publish."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def consuming(
    subject: str, headers: Mapping[str, str] | None, conversation_id: str | None
) -> Iterator[trace.Span]:
    """Handle one consumed message in a span continuing the trace its headers carry (a new one
    if none), with its conversation set for the log lines and tasks started within."""
    parent = propagate.extract(dict(headers or {}))
    with (
        _tracer.start_as_current_span(
            f"{subjects.family(subject)} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": subjects.family(subject),
                **({"taskbus.conversation_id": conversation_id} if conversation_id else {}),
            },
        ) as span,
        conversation(conversation_id),
    ):
        yield span


def span(name: str, **attributes: str | int | float | bool) -> Any:
    """A span of this process's own work (an LLM call, a sandbox command) in the current trace;
    a context manager yielding the span."""
    return _tracer.start_as_current_span(name, attributes=attributes)


# --- logging ----------------------------------------------------------------------------------


class RedactApiKeys(logging.Filter):
    """Masks `api_key=` query values (WebSocket URLs) and every other credential `redact` knows
    (e.g. a repository URL with a token in a query string) in any line, e.g. uvicorn's request
    lines, which are percent-encoded: they are decoded first so an encoded credential is seen."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(unquote(message))
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class _Context(logging.Filter):
    """Stamps the service, the conversation and the trace on every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self._service
        record.conversation_id = _conversation.get()
        context = trace.get_current_span().get_span_context()
        record.trace_id = trace.format_trace_id(context.trace_id) if context.is_valid else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service, conversation_id,
    trace_id, and the traceback (redacted) if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": getattr(record, "service", None),
            "conversation_id": getattr(record, "conversation_id", None),
            "trace_id": getattr(record, "trace_id", None),
        }
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return msgspec.json.encode(line).decode()


_TEXT = logging.Formatter(
    "%(asctime)s %(levelname)s %(service)s %(name)s [%(conversation_id)s]: %(message)s"
)


# --- tracing ----------------------------------------------------------------------------------


def tracer_provider(service: str, settings: ObservabilitySettings) -> TracerProvider:
    """A process that exports spans records all of its own, whether or not the caller's
    process did (so a trace is whole in the services that export, whatever the others do); one
    that exports nothing records none: its spans still carry trace and span ids, for the logs
    and for the next service, but cost no attributes or events (15-20% of session-manager's
    loop on the POST -> WebSocket path, recorded only to be dropped)."""
    processors: list[SpanProcessor] = []
    if settings.otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            logging.getLogger(__name__).warning(
                "TASKBUS_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp-proto-http is not "
                "installed: no spans are exported"
            )
        else:
            processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    if settings.traces_dir:
        directory = Path(settings.traces_dir)
        directory.mkdir(parents=True, exist_ok=True)
        exporter = JsonLinesExporter(directory / f"{service}-{os.getpid()}.jsonl")
        processors.append(SimpleSpanProcessor(exporter))  # nothing lost on a kill
    provider = TracerProvider(
        resource=Resource.create({"service.name": "taskbus-" + service.replace("_", "-")}),
        sampler=ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)
        if processors
        else ALWAYS_OFF,
    )
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


class JsonLinesExporter(SpanExporter):
    """Each span as one JSON line (the SDK's own `to_json`) appended to `path`."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def export(self, spans: Any) -> SpanExportResult:
        batch: list[ReadableSpan] = list(spans)
        for finished in batch:
            self._file.write(finished.to_json(indent=None) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()
