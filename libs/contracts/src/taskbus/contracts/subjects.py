"""Every NATS subject, stream and KV bucket name. No subject literal lives elsewhere."""

from __future__ import annotations

import re

from taskbus.contracts.partitions import PARTITIONS, partition_of

EVENTS_STREAM = "TASKBUS_EVENTS"
COMMANDS_STREAM = "TASKBUS_COMMANDS"
# Messages a consumer refused (bad id, id not matching the subject, undecodable), kept for the
# operator: never acted on.
DEADLETTER_STREAM = "TASKBUS_DEADLETTER"
# The events each runtime-runner acts on, forwarded from the log to the runner the conversation
# is placed on (contracts/runner_work.py): a work queue, one subject tree per runner.
RUNNER_WORK_STREAM = "TASKBUS_RUNNER_WORK"
CONVERSATIONS_BUCKET = "taskbus_conversations"
SETTINGS_BUCKET = "taskbus_settings"
# One entry per runtime-runner (key = runner id): its host, backend and sandbox isolation.
RUNNERS_BUCKET = "taskbus_runners"
# Session-manager's verdicts on conversation commands (key = the command's id), kept briefly.
VERDICTS_BUCKET = "taskbus_verdicts"
# Users' secrets and git provider tokens (key = user id), values sealed (contracts/secret_box).
SECRETS_BUCKET = "taskbus_secrets"
# Which instance of a stateful service owns which partition (contracts/partitions), with a TTL.
PARTITIONS_BUCKET = "taskbus_partitions"
# Which conversations hold a slot or wait for one, across every session-manager (one entry,
# revision-checked: session_manager/admission_ledger.py).
ADMISSION_BUCKET = "taskbus_admission"
# Each service instance's readiness heartbeat (key = `<service>.<instance id>`), read by the
# gateway's /api/health (contracts/observability_health.py).
HEALTH_BUCKET = "taskbus_health"
# Session-manager's snapshots of folded conversation states (key = conversation id), so a load
# reads a snapshot and the log's tail: a cache, checked against the log (session_manager.snapshots).
SNAPSHOTS_BUCKET = "taskbus_snapshots"
# Users' webhook registrations (key = `webhooks.user_key`), written by the gateway alone.
WEBHOOKS_BUCKET = "taskbus_webhooks"
# Webhook deliveries to make (one message per delivery, retried by redelivery) and the log of
# every attempt (one subject per webhook, bounded): contracts/webhooks.py.
WEBHOOK_JOBS_STREAM = "TASKBUS_WEBHOOK_JOBS"
WEBHOOK_LOG_STREAM = "TASKBUS_WEBHOOK_LOG"

EVENTS_PREFIX = "taskbus.events"
COMMANDS_PREFIX = "taskbus.cmd"
QUERIES_PREFIX = "taskbus.query"
DEADLETTER_PREFIX = "taskbus.deadletter"
# Requests about a conversation's workspace files (list, read, zip, git, upload): the runner
# that holds the workspace answers (core request-reply, like queries).
WORKSPACE_PREFIX = "taskbus.workspace"
RUNNER_WORK_PREFIX = "taskbus.runner"
WEBHOOK_JOBS_PREFIX = "taskbus.webhooks.job"
WEBHOOK_LOG_PREFIX = "taskbus.webhooks.log"

ALL_EVENTS = f"{EVENTS_PREFIX}.>"
ALL_COMMANDS = f"{COMMANDS_PREFIX}.>"
ALL_QUERIES = f"{QUERIES_PREFIX}.>"
ALL_DEADLETTERS = f"{DEADLETTER_PREFIX}.>"
ALL_WORKSPACE_REQUESTS = f"{WORKSPACE_PREFIX}.>"
ALL_RUNNER_WORK = f"{RUNNER_WORK_PREFIX}.>"
ALL_WEBHOOK_JOBS = f"{WEBHOOK_JOBS_PREFIX}.>"
ALL_WEBHOOK_LOGS = f"{WEBHOOK_LOG_PREFIX}.>"

# Service names: in command and dead-letter subjects, and as their NATS users.
GATEWAY = "gateway"
SESSION_MANAGER = "session_manager"
RUNTIME_RUNNER = "runtime_runner"
EVENT_STORE = "event_store"
SESSION_MANAGER_COMMANDS = f"{COMMANDS_PREFIX}.{SESSION_MANAGER}.>"
# Commands about a user rather than one conversation (settings, secrets): any instance applies
# them. A conversation's commands go to its partition's subject (`conversation_command_subject`).
USER_COMMANDS_TOKEN = "users"
SESSION_MANAGER_USER_COMMANDS = f"{COMMANDS_PREFIX}.{SESSION_MANAGER}.{USER_COMMANDS_TOKEN}.>"

# The durable consumers of the services (their defaults; the bus permissions name them).
SESSION_MANAGER_USER_COMMANDS_DURABLE = "session_manager_user_commands"
# A runner's own durable is this prefix and its id (`runtime_runner_durable`).
RUNTIME_RUNNER_DURABLE = "runtime_runner"
EVENT_STORE_DURABLE = "event_store"
# The gateway's webhook consumers, each shared by every gateway instance: status changes in,
# deliveries out.
WEBHOOK_EVENTS_DURABLE = "gateway_webhooks"
WEBHOOK_JOBS_DURABLE = "gateway_webhook_jobs"

# Conversation ids are subject tokens, so they are restricted to a safe alphabet.
CONVERSATION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class InvalidConversationId(ValueError):
    """An id that is not a safe subject token; it must never reach a subject or a path."""


def is_valid_conversation_id(conversation_id: str) -> bool:
    return bool(CONVERSATION_ID_PATTERN.fullmatch(conversation_id))


def require_conversation_id(conversation_id: str) -> str:
    """The id itself if it has the one allowed form; call before building a subject or a path."""
    if not is_valid_conversation_id(conversation_id):
        raise InvalidConversationId(f"invalid conversation id {conversation_id[:80]!r}")
    return conversation_id


def event_subject(conversation_id: str, kind: str) -> str:
    """`taskbus.events.<partition>.<conversation id>.<kind>`: the partition first, so an
    instance that owns some partitions consumes exactly their events."""
    return f"{EVENTS_PREFIX}.{partition_of(conversation_id)}.{conversation_id}.{kind}"


def conversation_events(conversation_id: str) -> str:
    """Wildcard matching every event of one conversation (used for dense-id appends and tails)."""
    return f"{EVENTS_PREFIX}.{partition_of(conversation_id)}.{conversation_id}.>"


def events_of_kind(kind: str, partition: int | None = None) -> str:
    """Every event of one kind, of one partition or of all."""
    return f"{EVENTS_PREFIX}.{'*' if partition is None else partition}.*.{kind}"


def partition_events(partition: int) -> str:
    return f"{EVENTS_PREFIX}.{partition}.>"


def conversation_id_of(subject: str) -> str:
    return subject.split(".")[3]


def partition_of_subject(subject: str) -> str:
    """The partition token of an event or conversation command subject."""
    return subject.split(".")[2 if subject.startswith(f"{EVENTS_PREFIX}.") else 3]


def session_manager_events_durable(partition: int) -> str:
    return f"session_manager_events_p{partition}"


def session_manager_commands_durable(partition: int) -> str:
    return f"session_manager_commands_p{partition}"


def session_manager_durables() -> list[tuple[str, str]]:
    """(stream, durable) of every consumer session-manager instances share out."""
    return [
        (COMMANDS_STREAM, SESSION_MANAGER_USER_COMMANDS_DURABLE),
        *((EVENTS_STREAM, session_manager_events_durable(p)) for p in range(PARTITIONS)),
        *((COMMANDS_STREAM, session_manager_commands_durable(p)) for p in range(PARTITIONS)),
    ]


def runner_work(runner_id: str) -> str:
    """Every work item of one runner."""
    return f"{RUNNER_WORK_PREFIX}.{runner_id}.>"


def runner_work_subject(runner_id: str, event_subject: str) -> str:
    """`taskbus.runner.<runner id>.<partition>.<conversation id>.<kind>`: the event's own subject
    under its runner's, so the runner checks it exactly as it would the event's."""
    return f"{RUNNER_WORK_PREFIX}.{runner_id}.{event_subject.removeprefix(EVENTS_PREFIX + '.')}"


def conversation_work(conversation_id: str) -> str:
    """Every work item of one conversation, whichever runner it went to."""
    return f"{RUNNER_WORK_PREFIX}.*.{partition_of(conversation_id)}.{conversation_id}.>"


def event_subject_of_work(work_subject: str) -> str:
    """The event subject a work item was forwarded from."""
    rest = work_subject.split(".", 3)[3] if work_subject.count(".") >= 3 else ""
    return f"{EVENTS_PREFIX}.{rest}"


def runtime_runner_durable(runner_id: str) -> str:
    return f"{RUNTIME_RUNNER_DURABLE}_{runner_id}"


def webhook_job_subject(webhook_id: str) -> str:
    return f"{WEBHOOK_JOBS_PREFIX}.{webhook_id}"


def webhook_log_subject(webhook_id: str) -> str:
    """Every attempt to deliver to one webhook (ids are subject tokens: `webhooks.WEBHOOK_ID`)."""
    return f"{WEBHOOK_LOG_PREFIX}.{webhook_id}"


def dead_letter_subject(service: str) -> str:
    """Where `service` puts the messages it refused."""
    return f"{DEADLETTER_PREFIX}.{service}"


def conversation_command_subject(conversation_id: str, command: str) -> str:
    """A command about one conversation, on its partition: its owner applies it."""
    return f"{COMMANDS_PREFIX}.{SESSION_MANAGER}.{partition_of(conversation_id)}.{command}"


def user_command_subject(command: str) -> str:
    return f"{COMMANDS_PREFIX}.{SESSION_MANAGER}.{USER_COMMANDS_TOKEN}.{command}"


def partition_commands(partition: int) -> str:
    return f"{COMMANDS_PREFIX}.{SESSION_MANAGER}.{partition}.>"


def verdict_subject(command_id: str) -> str:
    """The subject a verdict's KV put travels on: the asker subscribes to it to be told."""
    return f"$KV.{VERDICTS_BUCKET}.{command_id}"


def query_subject(name: str) -> str:
    return f"{QUERIES_PREFIX}.{name}"


def workspace_subject(operation: str) -> str:
    """Where a workspace request of this operation (e.g. `list_files`) goes."""
    return f"{WORKSPACE_PREFIX}.{operation}"


def family(subject: str) -> str:
    """`subject` with its unbounded tokens (conversation id, KV key, inbox, stream token) as
    `*`: what a metric may be labelled with."""
    tokens = subject.split(".")
    if subject.startswith(f"{EVENTS_PREFIX}.") and len(tokens) == 5:
        tokens[2:4] = ["*", "*"]
    elif subject.startswith(f"{COMMANDS_PREFIX}.") and len(tokens) == 5:
        tokens[3] = "*"
    elif subject.startswith(f"{RUNNER_WORK_PREFIX}.") and len(tokens) == 6:
        tokens[3:5] = ["*", "*"]  # partition and conversation; the runner id stays
    elif subject.startswith((f"{WEBHOOK_JOBS_PREFIX}.", f"{WEBHOOK_LOG_PREFIX}.")):
        tokens[3:] = ["*"]
    elif subject.startswith(("_INBOX", "$KV.")) or ".zip_next." in subject:
        tokens[2:] = ["*"]
    return ".".join(tokens)


def event_store_durable(partition: int, consumer_name: str = EVENT_STORE_DURABLE) -> str:
    """The event-store's ingest durable of one partition, shared by whichever instance holds
    the partition; `consumer_name` is the service's setting (a fresh one replays the log)."""
    return f"{consumer_name}_p{partition}"
