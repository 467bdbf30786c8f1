"""The words of the OpenAPI document that the code does not say itself: the API's overview,
what each body field and parameter means (by name, or `Schema.name` where a name means more
than one thing), and an example of each operation's request and main answer. Examples are
typed values of the bodies they show, so they cannot drift from them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from taskbus.contracts.openhands import OpenHandsStatus
from taskbus.contracts.queries import ResourceUsageInfo
from taskbus.contracts.specs import ConversationSpec, GitProvider, Timeouts, UserSettings
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.contracts.webhooks import AttemptOutcome, AttemptView, Delivery, WebhookEvent
from taskbus.gateway.conversations import ConversationList, ConversationView, CreatedConversation
from taskbus.gateway.inputs import MessageBody, StartBody
from taskbus.gateway.openhands_inputs import AddEventBody, RenameBody
from taskbus.gateway.secrets_routes import (
    ProviderTokenBody,
    ProviderTokensBody,
    SecretBody,
    SecretList,
    SecretsMessage,
    SecretUpdateBody,
    SecretView,
)
from taskbus.gateway.user_settings import SettingsView
from taskbus.gateway.webhooks_routes import (
    CreatedWebhook,
    DeliveryList,
    WebhookBody,
    WebhookDeleted,
    WebhookList,
    WebhookView,
)

API_DESCRIPTION = """\
Each conversation runs one AI coding agent in its own sandbox. Create one with a task, follow
its events, and steer it with commands (message, pause, resume, stop, confirm, reject).

- **Authentication**: `Authorization: Bearer <API key>`; every resource is scoped to the key's
  user, and another user's conversation is a 404.
- **Errors** are RFC 9457 `application/problem+json` documents, declared per operation.
- **Reads include your writes**: once you have seen event N anywhere (a create or command
  answer, a GET, a WebSocket frame), `/events` returns at least events 0..N.
- **Live events**: `WS /api/conversations/{conversation_id}/events?after_id=N` replays the
  events after N, then tails the log, and takes commands. Its protocol (frames, heartbeats,
  client messages, error frames and close codes) is in the repository's
  `docs/websocket.md` of the Taskbus repository.
- **OpenHands clients** (V0, 0.56.0) can drop in: bodies and answers carry OpenHands' fields and
  status words; Taskbus' own states are in fields of their own.
"""

WEBSOCKET_NOTE = (
    " The same path as a WebSocket (`after_id` instead of the search parameters) replays and "
    "then tails the events live: see docs/websocket.md."
)

_DESCRIPTIONS: dict[str, str] = {
    # conversations: the create body (ConversationSpec, OpenHands' InitSessionRequest + limits)
    "initial_user_msg": "The task: the conversation's first user message.",
    "repository": "Git repository URL cloned into the workspace (no credential in it).",
    "git_provider": "Where an `owner/name` repository lives, and which of your tokens (POST "
    "/api/add-git-providers) clones it: github, gitlab, bitbucket, azure_devops or generic.",
    "selected_branch": "Branch to check out after cloning.",
    "conversation_instructions": "Extra instructions for the agent, beside the task.",
    "mcp_config": "OpenHands' MCPConfig: MCP servers whose tools the agent may call beside its "
    "own. They run (stdio) or are reached (sse, shttp) from inside the sandbox, under its network "
    "policy. `api_key` and `env` values are sealed at once and only ever shown sealed. Null takes "
    "your settings' `mcp_config`.",
    "sse_servers": "Remote MCP servers over SSE: a URL, or `{url, api_key, timeout}`.",
    "shttp_servers": "Remote MCP servers over streamable HTTP: a URL or `{url, api_key, timeout}`.",
    "stdio_servers": "MCP servers run in the sandbox as a command speaking MCP on stdio.",
    "MCPRemoteServer.url": "The server's http(s) URL (no credential in it: use `api_key`).",
    "MCPRemoteServer.api_key": "Write-only key, sent as `Authorization: Bearer` (sealed at once).",
    "MCPRemoteServer.timeout": "Longest wait for one tool call, in seconds.",
    "MCPStdioServer.name": "The server's name; its tools are offered as `<name>_<tool>`.",
    "MCPStdioServer.command": "The program to run in the sandbox (e.g. `python3`, `npx`).",
    "MCPStdioServer.args": "Its arguments.",
    "MCPStdioServer.env": "Environment variables of the server (values sealed at once).",
    "image_urls": "Images of the message, sent to the LLM as image parts (https or data URLs).",
    "replay_json": "OpenHands' trajectory to replay: refused with a 422 saying why.",
    "suggested_task": "OpenHands' suggested task: the first message is written from it.",
    "create_microagent": "OpenHands' request to write a microagent for a repository.",
    "title": "The conversation's title; one is made from the task when absent.",
    "priority": "Admission and eviction order (-100..100): higher is never evicted for lower.",
    "max_budget_per_task": "LLM spend limit of one conversation, in USD.",
    "max_iterations": "Most agent steps before the conversation stops.",
    "confirmation_mode": "Whether each risky action waits for confirm or reject.",
    "timeouts": "Time limits; null fields take the user's setting or the operator's default.",
    "resources": "Sandbox limits asked for, capped by the operator's maxima.",
    "depends_on": "Ids of your conversations that must all FINISH before this one starts (it "
    "waits QUEUED, reason `waiting_for_dependencies`, then starts with their outcomes in view); "
    "if one ends in ERROR or STOPPED, or is deleted, this one fails (ERROR, `dependency_failed`). "
    "Unknown ids, other users' ids and cycles are a 422.",
    "SuggestedTask.git_provider": "Git provider of the repository.",
    "task_type": "What kind of work the suggestion is.",
    "repo": "Repository, as `owner/name`.",
    "issue_number": "The issue or pull request the task is about.",
    "SuggestedTask.title": "The issue's or pull request's title.",
    "CreateMicroagent.git_provider": "Git provider of the repository.",
    "CreateMicroagent.title": "Title of the conversation that writes the microagent.",
    "no_change_seconds": "A command with no new output for this long is interrupted.",
    "command_seconds": "Hard limit of one command.",
    "idle_seconds": "An idle conversation is stopped after this long.",
    "max_duration_seconds": "Wall-clock limit of the whole conversation.",
    "cpus": "CPUs of the sandbox.",
    "memory_mb": "Memory of the sandbox, in MiB.",
    "pids": "Most processes in the sandbox.",
    "network": "`none` (no network) or `bridge`.",
    # commands
    "MessageBody.message": "The user's message to the agent (also answers a pending action).",
    "providers_set": "OpenHands' git providers; accepted and unused (`git_provider` picks the "
    "token).",
    "RenameBody.title": "The new title (stripped; not blank).",
    "action": "OpenHands' action name: only `message` is taken.",
    "observation": "OpenHands' observation name: refused (a client adds no observation).",
    "AddEventBody.source": "Who sent it: only `user` (or absent) is taken.",
    "args": "OpenHands' MessageAction fields: `content` (required), `image_urls`, ...",
    "success": "Always true (OpenHands' reply shape).",
    "trajectory": "Every event, in id order, as `/events` serves it.",
    "runtime_id": "Id of the sandbox the conversation last had, or null before it had one.",
    "session_id": "The conversation's id (OpenHands' session id).",
    # settings
    "llm_model": "LLM model, with its provider prefix (e.g. `openai/gpt-4o`).",
    "llm_api_key": 'Write-only LLM API key (sealed at once); null keeps the stored one, `""` '
    "clears it.",
    "SettingsView.llm_api_key": "Always null: the key is never shown (see `llm_api_key_set`).",
    "llm_base_url": "LLM endpoint; must be one the operator allows.",
    "llm_api_key_set": "Whether an LLM API key is stored.",
    "max_concurrent_conversations": "Most conversations of yours running at once.",
    "no_change_timeout_seconds": "Default `timeouts.no_change_seconds` of your conversations.",
    "UserSettings.confirmation_mode": "Default `confirmation_mode` of your conversations.",
    "SettingsView.confirmation_mode": "Default `confirmation_mode` of your conversations.",
    "concurrency_policy": "At your limit, a new conversation evicts your oldest or is queued.",
    "UserSettings.mcp_config": "Default `mcp_config` of your conversations (secrets sealed).",
    "SettingsView.mcp_config": "Default `mcp_config` of your conversations; `api_key` and `env` "
    "values only as sealed tokens.",
    "agent": "OpenHands' agent name (fixed: CodeActAgent).",
    "language": "OpenHands' UI language (fixed: en).",
    "search_api_key_set": "OpenHands' search key flag (always false).",
    "security_analyzer": "OpenHands' security analyzer (always null).",
    "remote_runtime_resource_factor": "OpenHands' runtime size factor (always null).",
    "enable_default_condenser": "OpenHands' condenser switch (always true).",
    "condenser_max_size": "OpenHands' condenser size (always null).",
    "enable_sound_notifications": "OpenHands' UI setting (always false).",
    "enable_proactive_conversation_starters": "OpenHands' UI setting (always false).",
    "enable_solvability_analysis": "OpenHands' setting (always false).",
    "user_consents_to_analytics": "OpenHands' consent flag (always null).",
    "provider_tokens_set": "The providers you stored a git token for (POST "
    "/api/add-git-providers), each with its host (null: the provider's public one); never the "
    "tokens.",
    # answers
    "conversation_id": "The conversation's id.",
    "CreatedConversation.status": "Always `ok` (OpenHands' reply shape).",
    "CommandAccepted.status": "Always `ok` (OpenHands' reply shape).",
    "EventAdded.status": "Always `ok` (OpenHands' reply shape).",
    "EventAdded.message": "OpenHands' optional note on the reply (null).",
    "CommandAccepted.message": "OpenHands' optional note on the reply (null).",
    "conversation_status": "Status after the request, in OpenHands' five words.",
    "conversation": "The conversation as GET answers it.",
    "ConversationView.status": "Status in OpenHands' five words (see `taskbus_status`).",
    "taskbus_status": "Taskbus' own status (QUEUED, PAUSED, FINISHED, ...).",
    "agent_state": "The agent's state, in OpenHands' words.",
    "status_reason": "Why the status last changed (e.g. `cleanup`, `budget`).",
    "runtime_status": "The sandbox's state as OpenHands' `STATUS$...` message id.",
    "selected_repository": "The repository, as OpenHands names it.",
    "trigger": "What started it, in OpenHands' words.",
    "url": "Where the conversation's endpoints are.",
    "session_api_key": "Always null: the API key is the only credential.",
    "num_connections": "OpenHands' connection count (always 0).",
    "pr_number": "OpenHands' pull request numbers (always empty).",
    "created_at": "When it was created.",
    "last_updated_at": "When its last event was appended.",
    "accumulated_cost": "LLM spend so far, in USD.",
    "event_count": "How many events it has.",
    "last_event_id": "Id of its last event: every read includes the events up to it.",
    "resource_usage": "What its sandbox used when last measured (`ResourceUsage`, sampled every "
    "few seconds while it runs; kept after the sandbox is gone); null until measured once.",
    "cpu_seconds": "CPU time the sandbox used since it started, in seconds.",
    "ConversationResources.cpu_seconds": "CPU time of its sandboxes, added up, in seconds.",
    "memory_bytes": "Memory the sandbox held when measured (page cache and tmpfs included).",
    "memory_peak_bytes": "The most memory the sandbox held since it started.",
    "ConversationResources.memory_peak_bytes": "The most memory any of its sandboxes held.",
    "ResourceUsageInfo.pids": "Processes (and threads) in the sandbox when measured.",
    "disk_bytes": "Disk the workspace takes (a lower bound for a huge workspace).",
    "measured_by": "Where the figures come from: `cgroup`, `docker` or `process-tree`.",
    "measured_at": "When it was measured.",
    "ResourceUsageInfo.event_id": "Id of the ResourceUsage event it comes from.",
    "samples": "ResourceUsage events in the window.",
    "max_pids": "The most processes any sample counted.",
    "max_disk_bytes": "The largest workspace any sample measured.",
    "last_measured_at": "When it was last measured in the window.",
    "ResourceReport.conversations": "One row per conversation, highest peak memory first.",
    "results": "This page of conversations, newest first.",
    "next_page_id": "Cursor of the next page (`page_id`), or null on the last one.",
    "events": "This page of events, in id order (reverse order with `reverse`).",
    "has_more": "Whether more events match after this page; never false while the log holds more.",
    "next_start_id": "`start_id` of the next page, or null.",
    # health
    "HealthDocument.status": "`ok`, or `degraded` when NATS is unreachable.",
    "nats": "Whether the gateway is connected to NATS.",
    "runners": "The registered runtime-runners and their sandbox isolation.",
    "warnings": "Loud lines, e.g. a runner running untrusted code unsandboxed.",
    "HealthDocument.ready": "Whether every other service has a ready instance (see `services`).",
    "HealthDocument.services": "Each other service's readiness, by service name.",
    "ServiceReadiness.ready": "Whether at least one of its instances is ready.",
    "instances": "Its instances, as their last heartbeats tell (one every 2 s).",
    "service": "The service the instance belongs to.",
    "instance_id": "The instance's name (`TASKBUS_INSTANCE_ID`, a runner's id, or host-pid).",
    "InstanceHealth.host": "Host the instance runs on.",
    "pid": "The instance's process id on its host.",
    "InstanceHealth.ready": "Consuming, and heard from within the last 10 s.",
    "InstanceHealth.started_at": "When the instance started.",
    "beat_at": "When its last heartbeat was sent.",
    "metrics_port": "Port of its Prometheus `/metrics` on its host (0: not served).",
    "runner_id": "The runner's id.",
    "host": "Host the runner runs on.",
    "backend": "Sandbox backend: `docker` or `local`.",
    "isolation": "How its sandboxes are isolated (`none`: not at all).",
    "warning": "Why the isolation is weak, if it is.",
    "started_at": "When the runner started.",
    "RunnerInfo.slots": "Sandboxes it takes before new ones are placed elsewhere.",
    "RunnerInfo.sandboxes": "Sandboxes it holds, as of its last heartbeat (every 2 s).",
    "RunnerInfo.memory_mb": "Its host's memory, in MiB.",
    # analytics
    "group_by": "The key the buckets are grouped by.",
    "buckets": "One bucket per key, sorted by key.",
    "key": "The bucket's user, UTC day (YYYY-MM-DD), model or conversation id.",
    "cost": "LLM spend, in USD.",
    "llm_calls": "LLM calls made.",
    "prompt_tokens": "Prompt tokens sent.",
    "completion_tokens": "Completion tokens received.",
    "conversations": "How many of your conversations count in this row.",
    "FailingCommand.conversations": "Conversations in which the command failed.",
    "outcomes": "One row per final status, sorted by status.",
    "OutcomeStats.status": "The conversation's last status other than ARCHIVED.",
    "mean_seconds": "Mean duration, for the ended statuses only.",
    "p50_seconds": "Median duration, for the ended statuses only.",
    "p90_seconds": "90th percentile duration, for the ended statuses only.",
    "max_seconds": "Longest duration, for the ended statuses only.",
    "kinds": "Most frequent kind first, ties by kind name.",
    "kind": "The event kind.",
    "KindCount.events": "How many events of this kind.",
    "commands": "Most failures first, ties by command text.",
    "command": "The command line.",
    "failures": "Runs that exited non-zero.",
    "runs": "Runs with an exit code, failed or not.",
    "last_failed_at": "When it last failed.",
    "last_exit_code": "Its exit code then.",
    # secrets
    "SecretBody.name": "The secret's name: an environment variable's name, not a reserved one.",
    "SecretBody.value": "Write-only value (sealed at once, never shown; at most 4096 bytes).",
    "SecretBody.description": "What the secret is for.",
    "SecretBody.expose_in_sandbox": "Whether your sandboxes' shells have it as an environment "
    "variable (masked as `<secret_hidden>` in every event); true as in OpenHands.",
    "SecretUpdateBody.name": "The secret's name from now on (the same to keep it).",
    "SecretUpdateBody.description": "A new description; null keeps it.",
    "SecretUpdateBody.value": "A new write-only value; null keeps it.",
    "SecretUpdateBody.expose_in_sandbox": "Whether sandboxes get it; null keeps the setting.",
    "custom_secrets": "Your custom secrets, by name, without their values.",
    "SecretView.name": "The secret's name.",
    "SecretView.description": "What the secret is for.",
    "SecretView.expose_in_sandbox": "Whether your sandboxes' shells have it.",
    "provider_tokens": "Tokens by provider: github, gitlab, bitbucket, azure_devops, generic.",
    "ProviderTokenBody.token": "Write-only token (sealed at once); empty keeps the stored one.",
    "ProviderTokenBody.host": "The provider's host when not its public one (`name[:port]`, or "
    "`http://name[:port]`); required for `generic` with an `owner/name` repository.",
    "ProviderTokenBody.user_id": "OpenHands' provider-side user id; accepted, unused.",
    "SecretsMessage.message": "What was done (OpenHands' answer).",
    # webhooks
    "WebhookBody.url": "Where to POST: http(s), no credentials, query or fragment; its host "
    "must be public (a loopback, private or link-local address is a 422).",
    "WebhookBody.events": "Which changes to send: `conversation.finished` (a change to "
    "FINISHED), `conversation.status_changed` (every other change); both by default.",
    **{
        f"{view}.{field}": text
        for view in ("WebhookView", "CreatedWebhook")
        for field, text in {
            "id": "The webhook's id.",
            "url": "Where deliveries are POSTed.",
            "events": "The changes it is sent.",
            "created_at": "When it was registered.",
        }.items()
    },
    "CreatedWebhook.secret": "The HMAC-SHA256 key of `X-Taskbus-Signature`: shown only now.",
    "WebhookList.webhooks": "Your webhooks, oldest first, without their secrets.",
    "WebhookDeleted.message": "What was done.",
    "DeliveryList.deliveries": "Deliveries, newest first.",
    "Delivery.delivery_id": "The `X-Taskbus-Delivery` id, the same on every attempt.",
    "Delivery.event": "What was delivered.",
    "Delivery.conversation_id": "The conversation whose status changed.",
    "Delivery.event_id": "The status change's event id in the conversation.",
    "Delivery.status": "The status it changed to.",
    "Delivery.outcome": "Its latest attempt's outcome: delivered, retrying or failed.",
    "Delivery.attempts": "Every attempt, oldest first.",
    "AttemptView.attempt": "The attempt's number, from 1.",
    "AttemptView.at": "When it ended.",
    "AttemptView.status_code": "The receiver's HTTP status; null when none came.",
    "AttemptView.error": "Why no status came (timeout, refused connection, refused address).",
    "AttemptView.outcome": "delivered (2xx), retrying (no answer, 408, 429, 5xx) or failed.",
    "AttemptView.duration_ms": "How long the attempt took.",
    # problems
    "ProblemDocument.type": "URI of the problem type (`urn:taskbus:problem:<kind>`).",
    "ProblemDocument.title": "Short summary of the problem type.",
    "ProblemDocument.status": "The HTTP status code.",
    "detail": "What went wrong with this request.",
    "instance": "The request path.",
}

PARAMETER_DESCRIPTIONS: dict[str, str] = {
    "conversation_id": "The conversation's id (as the create answered it).",
    "event_id": "The event's id (dense from 0).",
    "page_id": "Cursor from the previous page's `next_page_id`.",
    "status": "Only conversations with this Taskbus status (`taskbus_status`).",
    "repository": "Only conversations of this repository URL.",
    "conversation_trigger": "Only conversations started by this trigger (OpenHands' words).",
    "start_id": "First event id of the page (the last one with `reverse`).",
    "reverse": "Newest first.",
    "source": "Only events from this source.",
    "group_by": "Bucket key: user, UTC day, model or conversation.",
    "path": "A path relative to the workspace (list-files: a directory, empty for the top; "
    "git/diff: a file).",
    "file": "The file's path relative to the workspace.",
}


def description(schema_name: str, field: str) -> str | None:
    return _DESCRIPTIONS.get(f"{schema_name}.{field}") or _DESCRIPTIONS.get(field)


_CID = "5d3c9a0f6b2e4c7d8e1f2a3b4c5d6e7f"
_WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
_VIEW = ConversationView(
    conversation_id=_CID,
    title="Fix the failing test",
    status=OpenHandsStatus.RUNNING,
    taskbus_status=ConversationStatus.RUNNING,
    agent_state=AgentState.RUNNING,
    status_reason="",
    runtime_status="STATUS$READY",
    selected_repository="https://github.com/octo/app.git",
    selected_branch="main",
    git_provider="github",
    trigger="openhands_api",
    url=f"/api/conversations/{_CID}",
    priority=0,
    created_at=_WHEN,
    last_updated_at=_WHEN,
    accumulated_cost=0.0123,
    event_count=7,
    last_event_id=6,
    resource_usage=ResourceUsageInfo(
        cpu_seconds=12.5,
        memory_bytes=180_000_000,
        memory_peak_bytes=420_000_000,
        pids=7,
        disk_bytes=35_000_000,
        measured_by="cgroup",
        measured_at=_WHEN,
        event_id=5,
    ),
)
_EVENT = {
    "id": 3,
    "kind": "CmdRunAction",
    "conversation_id": _CID,
    "timestamp": "2025-01-02T03:04:05Z",
    "source": "agent",
    "cause": None,
    "action": "run",
    "message": "Running the tests",
    "args": {"command": "pytest -q", "is_input": False, "blocking": False, "thought": ""},
    "timeout": None,
}
_ACCEPTED = {
    "status": "ok",
    "conversation_id": _CID,
    "EventAdded.status": "Always `ok` (OpenHands' reply shape).",
    "EventAdded.message": "OpenHands' optional note on the reply (null).",
    "CommandAccepted.message": "OpenHands' optional note on the reply (null).",
    "conversation_status": "RUNNING",
    "taskbus_status": "RUNNING",
    "last_event_id": 7,
}
_SETTINGS = UserSettings(llm_model="openai/gpt-4o", max_iterations=100, confirmation_mode=True)

_FILES = "/api/conversations/{conversation_id}"
_WEBHOOK = WebhookView(
    id="wh_9c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f",
    url="https://ci.example.com/taskbus",
    events=[WebhookEvent.FINISHED],
    created_at=_WHEN,
)
# (path, method) -> (request example or None, example of the main success answer)
EXAMPLES: dict[tuple[str, str], tuple[Any, Any]] = {
    ("/api/conversations", "post"): (
        ConversationSpec(
            initial_user_msg="Write hello.py that prints hello, and run it.",
            max_iterations=50,
            timeouts=Timeouts(no_change_seconds=60),
        ),
        CreatedConversation(
            conversation_id=_CID, conversation_status=OpenHandsStatus.STARTING, conversation=_VIEW
        ),
    ),
    ("/api/conversations", "get"): (None, ConversationList(results=[_VIEW], next_page_id=None)),
    ("/api/conversations/{conversation_id}", "get"): (None, _VIEW),
    ("/api/conversations/{conversation_id}", "delete"): (None, _ACCEPTED),
    ("/api/conversations/{conversation_id}", "patch"): (RenameBody(title="Fix the tests"), True),
    ("/api/conversations/{conversation_id}/events", "post"): (
        AddEventBody(action="message", source="user", args={"content": "Also add a README."}),
        {**_ACCEPTED, "success": True},
    ),
    ("/api/conversations/{conversation_id}/trajectory", "get"): (None, {"trajectory": [_EVENT]}),
    ("/api/conversations/{conversation_id}/config", "get"): (
        None,
        {"runtime_id": "sandbox-5d3c9a0f", "session_id": _CID},
    ),
    ("/api/conversations/{conversation_id}/message", "post"): (
        MessageBody(message="Use the standard library only."),
        _ACCEPTED,
    ),
    ("/api/conversations/{conversation_id}/start", "post"): (
        StartBody(providers_set=["github"]),
        _ACCEPTED,
    ),
    **{
        (f"/api/conversations/{{conversation_id}}/{action}", "post"): ({}, _ACCEPTED)
        for action in ("stop", "pause", "resume", "confirm", "reject")
    },
    ("/api/conversations/{conversation_id}/events", "get"): (
        None,
        {"events": [_EVENT], "has_more": True, "next_start_id": 4},
    ),
    ("/api/conversations/{conversation_id}/events/{event_id}", "get"): (None, _EVENT),
    ("/api/settings", "get"): (None, SettingsView.of(_SETTINGS)),
    ("/api/settings", "put"): (_SETTINGS, SettingsView.of(_SETTINGS)),
    ("/api/settings", "post"): (_SETTINGS, SettingsView.of(_SETTINGS)),
    ("/api/secrets", "get"): (
        None,
        SecretList(
            custom_secrets=[
                SecretView(name="NPM_TOKEN", description="npm publish", expose_in_sandbox=True)
            ]
        ),
    ),
    ("/api/secrets", "post"): (
        SecretBody(name="NPM_TOKEN", value="npm_abc123", description="npm publish"),
        SecretsMessage(message="Secret created successfully"),
    ),
    ("/api/secrets/{secret_id}", "put"): (
        SecretUpdateBody(name="NPM_PUBLISH_TOKEN", description="npm publish (CI)"),
        SecretsMessage(message="Secret updated successfully"),
    ),
    ("/api/secrets/{secret_id}", "delete"): (
        None,
        SecretsMessage(message="Secret deleted successfully"),
    ),
    ("/api/add-git-providers", "post"): (
        ProviderTokensBody(
            provider_tokens={GitProvider.GITHUB: ProviderTokenBody(token="ghp_abc123")}
        ),
        SecretsMessage(message="Git providers stored"),
    ),
    ("/api/unset-provider-tokens", "post"): (
        None,
        SecretsMessage(message="Unset Git provider tokens"),
    ),
    ("/api/webhooks", "post"): (
        WebhookBody(url="https://ci.example.com/taskbus", events=[WebhookEvent.FINISHED]),
        CreatedWebhook(
            **msgspec.structs.asdict(_WEBHOOK), secret="whsec_3q2-7wXkPZp0c1YbLrXhq9eQ0nV3m4"
        ),
    ),
    ("/api/webhooks", "get"): (None, WebhookList(webhooks=[_WEBHOOK])),
    ("/api/webhooks/{webhook_id}", "delete"): (None, WebhookDeleted(message="Webhook deleted")),
    ("/api/webhooks/{webhook_id}/deliveries", "get"): (
        None,
        DeliveryList(
            deliveries=[
                Delivery(
                    delivery_id="dl_0f6b2e4c7d8e1f2a3b4c5d6e7f5d3c9a",
                    event=WebhookEvent.FINISHED,
                    conversation_id=_CID,
                    event_id=12,
                    status=ConversationStatus.FINISHED,
                    outcome=AttemptOutcome.DELIVERED,
                    attempts=[
                        AttemptView(
                            attempt=1,
                            at=_WHEN,
                            status_code=503,
                            error="",
                            outcome=AttemptOutcome.RETRYING,
                            duration_ms=41.0,
                        ),
                        AttemptView(
                            attempt=2,
                            at=_WHEN,
                            status_code=200,
                            error="",
                            outcome=AttemptOutcome.DELIVERED,
                            duration_ms=12.5,
                        ),
                    ],
                )
            ]
        ),
    ),
    ("/api/health", "get"): (
        None,
        {
            "status": "ok",
            "nats": True,
            "ready": True,
            "services": {
                service: {
                    "ready": True,
                    "instances": [
                        {
                            "service": service,
                            "instance_id": f"{service}-1",
                            "host": "worker-1",
                            "pid": 7,
                            "ready": True,
                            "started_at": "2025-01-02T03:04:05Z",
                            "beat_at": "2025-01-02T03:09:05Z",
                            "metrics_port": 9464,
                        }
                    ],
                }
                for service in ("session_manager", "runtime_runner", "event_store")
            },
            "runners": [
                {
                    "runner_id": "runner-1",
                    "host": "worker-1",
                    "backend": "docker",
                    "isolation": "gvisor",
                    "warning": None,
                    "started_at": "2025-01-02T03:04:05Z",
                }
            ],
            "warnings": [],
        },
    ),
    (f"{_FILES}/list-files", "get"): (None, ["src/", "README.md", "hello.py"]),
    (f"{_FILES}/select-file", "get"): (
        None,
        {"code": "print('hello')\n", "content_type": "text/x-python; charset=utf-8"},
    ),
    (f"{_FILES}/zip-directory", "get"): (None, "<the zip's bytes>"),
    (f"{_FILES}/git/changes", "get"): (
        None,
        [{"status": "M", "path": "README.md"}, {"status": "A", "path": "hello.py"}],
    ),
    (f"{_FILES}/git/diff", "get"): (
        None,
        {"original": "# App\n", "modified": "# App\n\nSays hello.\n"},
    ),
    (f"{_FILES}/upload-files", "post"): (
        None,
        {"uploaded_files": ["data.csv"], "skipped_files": [{"name": "../x", "reason": "..."}]},
    ),
    ("/api/analytics/cost", "get"): (
        None,
        {
            "group_by": "day",
            "buckets": [
                {
                    "key": "2025-01-02",
                    "cost": 0.42,
                    "llm_calls": 12,
                    "prompt_tokens": 30_000,
                    "completion_tokens": 2_000,
                    "conversations": 3,
                }
            ],
        },
    ),
    ("/api/analytics/durations", "get"): (
        None,
        {
            "outcomes": [
                {
                    "status": "FINISHED",
                    "conversations": 3,
                    "mean_seconds": 95.0,
                    "p50_seconds": 80.0,
                    "p90_seconds": 140.0,
                    "max_seconds": 150.0,
                }
            ]
        },
    ),
    ("/api/analytics/event-kinds", "get"): (
        None,
        {"kinds": [{"kind": "CmdRunAction", "events": 40, "conversations": 3}]},
    ),
    ("/api/analytics/resources", "get"): (
        None,
        {
            "conversations": [
                {
                    "conversation_id": _CID,
                    "samples": 24,
                    "cpu_seconds": 31.2,
                    "memory_peak_bytes": 420_000_000,
                    "max_pids": 9,
                    "max_disk_bytes": 35_000_000,
                    "last_measured_at": "2025-01-02T03:04:05Z",
                }
            ]
        },
    ),
    ("/api/analytics/failing-commands", "get"): (
        None,
        {
            "commands": [
                {
                    "command": "pytest -q",
                    "failures": 4,
                    "runs": 9,
                    "conversations": 2,
                    "last_failed_at": "2025-01-02T03:04:05Z",
                    "last_exit_code": 1,
                }
            ]
        },
    ),
}


def as_json(example: Any) -> Any:
    return msgspec.to_builtins(example)
