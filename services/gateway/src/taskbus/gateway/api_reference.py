"""The words of the OpenAPI document that the code does not say itself: the API's overview,
what each body field and parameter means (by name, or `Schema.name` where a name means more
than one thing), and an example of each operation's request and main answer. Examples are
typed values of the bodies they show, so they cannot drift from them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from taskbus.contracts.openhands import OpenHandsStatus
from taskbus.contracts.specs import ConversationSpec, Timeouts, UserSettings
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.gateway.conversations import ConversationList, ConversationView, CreatedConversation
from taskbus.gateway.inputs import MessageBody, StartBody
from taskbus.gateway.openhands_inputs import AddEventBody, RenameBody
from taskbus.gateway.user_settings import SettingsView

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
    "git_provider": "OpenHands' git provider name of the repository (e.g. `github`).",
    "selected_branch": "Branch to check out after cloning.",
    "conversation_instructions": "Extra instructions for the agent, beside the task.",
    "mcp_config": "OpenHands' MCP configuration (bounded in size and nesting).",
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
    "providers_set": "OpenHands' git providers; accepted and unused (Taskbus holds no tokens).",
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
    "provider_tokens_set": "OpenHands' git provider tokens (always empty).",
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
    "runner_id": "The runner's id.",
    "host": "Host the runner runs on.",
    "backend": "Sandbox backend: `docker` or `local`.",
    "isolation": "How its sandboxes are isolated (`none`: not at all).",
    "warning": "Why the isolation is weak, if it is.",
    "started_at": "When the runner started.",
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
    ("/api/health", "get"): (
        None,
        {
            "status": "ok",
            "nats": True,
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
