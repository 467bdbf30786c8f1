"""Who may do what on the bus: one NATS user per service, with the subjects it needs and no more.

`taskbus up` writes these users into its nats-server config, and `taskbus nats-auth` writes the
same for a deployment (deploy/nats). The JetStream API is itself a set of subjects
(`$JS.API.<verb>.<stream>...`), so "may read the log but not append to it" is a publish allow
list. What each service may do, and why:

- gateway: sends commands, queries and workspace requests; reads events (direct gets,
  ephemeral ordered consumers for WebSocket tails, the ConversationCreated notification) and
  the conversations, settings, runners, verdicts and secrets buckets (watching a verdict's key
  as it is stored). It appends no event and writes no bucket but its own webhooks one; it
  delivers webhooks: its durables on status changes and on its delivery jobs, the jobs and
  the delivery log (its own streams).
- session-manager: appends events, writes the settings, verdicts and secrets buckets (their
  only writer) and its own partition leases, consumes its partitions' durables and throwaway
  recovery consumers (never another service's durable), reads the conversations bucket
  (deleted conversations' tombstones).
- runtime-runner: appends events (observations), writes the runners bucket, reads the secrets
  bucket (git tokens, sandbox secrets; never the settings bucket), consumes its durable,
  answers workspace requests (files of the workspaces on its host).
- event-store: writes the conversations bucket and its own partition leases, consumes its
  partitions' durables (a rebuild deletes and re-creates them), answers queries, and purges
  deleted conversations from the log (the one purge any service may do; JetStream cannot
  narrow it to a subject by permission).

No service may create, update or delete a stream, or delete a message: the admin
credential (the launcher's, or a deployment's one-shot `python -m taskbus.contracts.streams`)
creates the streams; a service's `ensure_streams` then only reads their info. Each user
subscribes only to its own inboxes (`bus.inbox_prefix`), so none can read another's replies.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taskbus.contracts import subjects
from taskbus.contracts.bus import BusCredential, inbox_prefix, write_credential
from taskbus.contracts.partitions import PARTITIONS

GATEWAY = subjects.GATEWAY
SESSION_MANAGER = subjects.SESSION_MANAGER
RUNTIME_RUNNER = subjects.RUNTIME_RUNNER
EVENT_STORE = subjects.EVENT_STORE
# The launcher's and the operator's user: creates streams, reads everything (no limits).
ADMIN = "admin"
SERVICE_USERS = (GATEWAY, SESSION_MANAGER, RUNTIME_RUNNER, EVENT_STORE)
USERS = (*SERVICE_USERS, ADMIN)

_API = "$JS.API"
_EVENTS = subjects.EVENTS_STREAM
_COMMANDS = subjects.COMMANDS_STREAM


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _stream_info(*streams: str) -> list[str]:
    return [f"{_API}.STREAM.INFO.{stream}" for stream in streams]


def _all_stream_info() -> list[str]:
    """`ensure_streams` reads the info of every stream and bucket."""
    buckets = (
        subjects.CONVERSATIONS_BUCKET,
        subjects.SETTINGS_BUCKET,
        subjects.RUNNERS_BUCKET,
        subjects.VERDICTS_BUCKET,
        subjects.SECRETS_BUCKET,
        subjects.PARTITIONS_BUCKET,
        subjects.ADMISSION_BUCKET,
        subjects.WEBHOOKS_BUCKET,
        subjects.HEALTH_BUCKET,
        subjects.SNAPSHOTS_BUCKET,
    )
    return [
        f"{_API}.INFO",
        f"{_API}.STREAM.NAMES",
        *_stream_info(_EVENTS, _COMMANDS, subjects.DEADLETTER_STREAM, subjects.RUNNER_WORK_STREAM),
        *_stream_info(subjects.WEBHOOK_JOBS_STREAM, subjects.WEBHOOK_LOG_STREAM),
        *_stream_info(*(_kv_stream(bucket) for bucket in buckets)),
    ]


def _ephemeral_consumers(stream: str) -> list[str]:
    """Ordered consumers (tails, KV key listings) with their flow control. The create subject
    names no consumer, so the server accepts only ephemeral ones: no durable can be taken."""
    return [
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.INFO.{stream}.*",  # read-only: counters, no messages
        f"$JS.FC.{stream}.>",
    ]


def _read_log() -> list[str]:
    return [
        f"{_API}.DIRECT.GET.{_EVENTS}",
        f"{_API}.DIRECT.GET.{_EVENTS}.>",
        # The leader's copy, when a replica's (direct get) may lag: the appender's re-reads.
        f"{_API}.STREAM.MSG.GET.{_EVENTS}",
        *_ephemeral_consumers(_EVENTS),
    ]


def _read_bucket(bucket: str) -> list[str]:
    stream = _kv_stream(bucket)
    return [
        f"{_API}.DIRECT.GET.{stream}.>",
        f"{_API}.STREAM.MSG.GET.{stream}",
        *_ephemeral_consumers(stream),
    ]


def _write_bucket(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


def _write_leases(group: str) -> list[str]:
    """A service's own partition leases (keys `<group>.…`, contracts.partitions), no other's."""
    return [f"$KV.{subjects.PARTITIONS_BUCKET}.{group}.>"]


def _write_health(service: str) -> list[str]:
    """A service's own readiness heartbeats (keys `<service>.…`, contracts.observability_health):
    no service can report another ready or take its entry away."""
    return [f"$KV.{subjects.HEALTH_BUCKET}.{service}.>"]


def _event_store_durables() -> list[str]:
    return [subjects.event_store_durable(p) for p in range(PARTITIONS)]


def _durable(stream: str, name: str) -> list[str]:
    return [
        f"{_API}.CONSUMER.CREATE.{stream}.{name}",
        f"{_API}.CONSUMER.CREATE.{stream}.{name}.>",
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
        f"{_API}.CONSUMER.INFO.{stream}.{name}",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


def _others_durables(own: tuple[str, ...]) -> list[str]:
    """Every verb on the other services' durables, for users allowed `*` consumers."""
    durables = (
        *(name for stream, name in subjects.session_manager_durables() if stream == _EVENTS),
        *_event_store_durables(),
        subjects.WEBHOOK_EVENTS_DURABLE,
    )
    verbs = ("CREATE", "DURABLE.CREATE", "DELETE", "MSG.NEXT")
    return [
        f"{_API}.CONSUMER.{verb}.{_EVENTS}.{name}{suffix}"
        for name in durables
        if name not in own
        for verb in verbs
        for suffix in ("", ".>")
    ]


def permissions(user: str) -> dict[str, Any] | None:
    """The NATS `permissions` block of `user` (None: the admin, unrestricted)."""
    if user == ADMIN:
        return None
    own_inboxes = f"{inbox_prefix(user)}.>"
    publish: list[str] = [*_all_stream_info(), *_read_log()]
    publish_deny: list[str] = []
    subscribe = [own_inboxes]
    allow_responses = False
    if user == GATEWAY:
        publish += [
            subjects.ALL_COMMANDS,
            subjects.ALL_QUERIES,
            *_read_bucket(subjects.CONVERSATIONS_BUCKET),
            *_read_bucket(subjects.SETTINGS_BUCKET),
            *_read_bucket(subjects.RUNNERS_BUCKET),
            *_read_bucket(subjects.VERDICTS_BUCKET),
            # Lists a user's secret names and waits for a secrets command to be stored; the
            # values are sealed, and the gateway (which seals them) holds the key anyway.
            *_read_bucket(subjects.SECRETS_BUCKET),
            # Asks the runner for a conversation's workspace files (list, read, zip, git,
            # upload), after checking the conversation is the caller's.
            subjects.ALL_WORKSPACE_REQUESTS,
            # Webhooks: the registrations (their only writer: the gateway takes them and
            # delivers them); status changes fanned out into delivery jobs, each attempt
            # logged and read back; refused events dead-lettered.
            *_read_bucket(subjects.WEBHOOKS_BUCKET),
            *_write_bucket(subjects.WEBHOOKS_BUCKET),
            *_durable(_EVENTS, subjects.WEBHOOK_EVENTS_DURABLE),
            *_durable(subjects.WEBHOOK_JOBS_STREAM, subjects.WEBHOOK_JOBS_DURABLE),
            subjects.ALL_WEBHOOK_JOBS,
            subjects.ALL_WEBHOOK_LOGS,
            f"{_API}.DIRECT.GET.{subjects.WEBHOOK_LOG_STREAM}",
            f"{_API}.DIRECT.GET.{subjects.WEBHOOK_LOG_STREAM}.>",
            subjects.dead_letter_subject(user),
            # Every instance's readiness heartbeat, for /api/health.
            *_read_bucket(subjects.HEALTH_BUCKET),
        ]
        subscribe += [
            # A create waits for the conversation's first events (created or rejected); the
            # gateway reads the whole log anyway, so watching it grants nothing new.
            subjects.ALL_EVENTS,
            subjects.verdict_subject("*"),  # told of a command's verdict as it is stored
        ]
    elif user == SESSION_MANAGER:
        recovery = ("CREATE", "DELETE", "INFO", "MSG.NEXT")
        publish += [
            subjects.ALL_EVENTS,
            subjects.dead_letter_subject(user),
            *_read_bucket(subjects.SETTINGS_BUCKET),
            *_write_bucket(subjects.SETTINGS_BUCKET),
            # The tombstones of deleted conversations: their ids are never created again.
            *_read_bucket(subjects.CONVERSATIONS_BUCKET),
            *_read_bucket(subjects.VERDICTS_BUCKET),
            *_write_bucket(subjects.VERDICTS_BUCKET),
            # The secrets bucket's only writer: it applies the gateway's secrets commands,
            # reading the entry first (revision-checked updates).
            *_read_bucket(subjects.SECRETS_BUCKET),
            *_write_bucket(subjects.SECRETS_BUCKET),
            # Its partitions' durables (whichever instance holds the partition's lease) and the
            # user commands' one, shared by every instance.
            *(
                permission
                for stream, name in subjects.session_manager_durables()
                for permission in _durable(stream, name)
            ),
            *_read_bucket(subjects.PARTITIONS_BUCKET),
            *_write_leases(subjects.SESSION_MANAGER),
            # The admission ledger all instances share (its only reader and writer).
            *_read_bucket(subjects.ADMISSION_BUCKET),
            *_write_bucket(subjects.ADMISSION_BUCKET),
            # Its snapshots of folded conversations (their only reader and writer): a load
            # reads one and the log's tail; a deleted conversation's is purged.
            *_read_bucket(subjects.SNAPSHOTS_BUCKET),
            *_write_bucket(subjects.SNAPSHOTS_BUCKET),
            # Places sandboxes on runners (their heartbeats) and forwards them their work.
            *_read_bucket(subjects.RUNNERS_BUCKET),
            subjects.ALL_RUNNER_WORK,
            *_write_health(user),
            # Throwaway recovery consumers have random names; the others' durables stay out.
            *(f"{_API}.CONSUMER.{verb}.{_EVENTS}.*" for verb in recovery),
        ]
        own = tuple(name for _, name in subjects.session_manager_durables())
        publish_deny += _others_durables(own)
    elif user == RUNTIME_RUNNER:
        publish += [
            subjects.ALL_EVENTS,
            subjects.dead_letter_subject(user),
            *_read_bucket(subjects.RUNNERS_BUCKET),
            *_write_bucket(subjects.RUNNERS_BUCKET),
            # Opens a user's git tokens and sandbox secrets at sandbox start (read only); never
            # the settings bucket, whose LLM keys the runner has no use for.
            *_read_bucket(subjects.SECRETS_BUCKET),
            # Its own work (`runtime_runner_<runner id>`): every runner logs in as this user,
            # and a durable name is one subject token, so the grant names any durable of the
            # work stream, which no other user may touch.
            *_durable(subjects.RUNNER_WORK_STREAM, "*"),
            *_write_health(user),
        ]
        # Answers workspace requests (contracts/workspace.py) to the asker's inbox only.
        subscribe.append(subjects.ALL_WORKSPACE_REQUESTS)
        allow_responses = True
    elif user == EVENT_STORE:
        publish += [
            subjects.dead_letter_subject(user),
            *_read_bucket(subjects.CONVERSATIONS_BUCKET),
            *_write_bucket(subjects.CONVERSATIONS_BUCKET),
            # Its partitions' durables (whichever instance holds the partition's lease), which
            # a rebuild deletes and re-creates, and its own leases.
            *(grant for name in _event_store_durables() for grant in _durable(_EVENTS, name)),
            *(f"{_API}.CONSUMER.DELETE.{_EVENTS}.{name}" for name in _event_store_durables()),
            *_read_bucket(subjects.PARTITIONS_BUCKET),
            *_write_leases(subjects.EVENT_STORE),
            f"{_API}.STREAM.PURGE.{_EVENTS}",  # a deleted conversation's events (see purge)
            # Whether a deleted conversation's work still waits for its runner (see purge).
            f"{_API}.STREAM.MSG.GET.{subjects.RUNNER_WORK_STREAM}",
            *_write_health(user),
        ]
        subscribe.append(subjects.ALL_QUERIES)
        allow_responses = True  # replies go to the asker's inbox, and only there
    else:
        raise ValueError(f"unknown bus user {user!r}")
    block: dict[str, Any] = {
        "publish": {"allow": publish, **({"deny": publish_deny} if publish_deny else {})},
        "subscribe": {"allow": subscribe},
    }
    if allow_responses:
        block["allow_responses"] = True
    return block


def render_authorization(passwords: Mapping[str, str]) -> str:
    """The nats-server `authorization` block for every user (NATS config syntax; passwords in
    plain text, so the file is the operator's alone, like the credential files)."""
    users = []
    for user in USERS:
        entry: dict[str, Any] = {"user": user, "password": passwords[user]}
        block = permissions(user)
        if block is not None:
            entry["permissions"] = block
        users.append(entry)
    return "authorization " + _render({"users": users}) + "\n"


def _render(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_render(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_render(item) for item in value) + "]"
    return json.dumps(value)


def new_credentials(directory: Path) -> dict[str, BusCredential]:
    """A fresh password per user, each in `<directory>/<user>.json` (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    credentials = {}
    for user in USERS:
        credential = BusCredential(user=user, password=secrets.token_urlsafe(32))
        write_credential(credential_file(directory, user), credential)
        credentials[user] = credential
    return credentials


def credential_file(directory: Path, user: str) -> Path:
    return directory / f"{user}.json"
