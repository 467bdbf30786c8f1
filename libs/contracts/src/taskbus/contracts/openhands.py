"""OpenHands' vocabulary (V0, tag 0.56.0) for what Taskbus says in its own words, written once.

OpenHands clients read a conversation's `status` / `conversation_status` in five words and the
sandbox's `runtime_status` as `STATUS$...` message ids; Taskbus' finer states (QUEUED, PAUSED,
FINISHED, the reasons) stay in fields of their own (`taskbus_status`, `status_reason`).
"""

from __future__ import annotations

import enum

from taskbus.contracts.specs import ConversationSpec, SuggestedTask
from taskbus.contracts.status import ConversationStatus

_S = ConversationStatus


class OpenHandsStatus(enum.StrEnum):
    """openhands/storage/data_models/conversation_status.py"""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    ARCHIVED = "ARCHIVED"
    ERROR = "ERROR"


# A queued conversation is on its way to a sandbox (STARTING); a paused one keeps its loop and
# sandbox (RUNNING, as an OpenHands agent paused in a live loop); a finished one holds no running
# loop, and a new message restarts it, as OpenHands restarts a STOPPED conversation.
OPENHANDS_STATUS: dict[ConversationStatus, OpenHandsStatus] = {
    _S.QUEUED: OpenHandsStatus.STARTING,
    _S.STARTING: OpenHandsStatus.STARTING,
    _S.RUNNING: OpenHandsStatus.RUNNING,
    _S.PAUSED: OpenHandsStatus.RUNNING,
    _S.STOPPED: OpenHandsStatus.STOPPED,
    _S.FINISHED: OpenHandsStatus.STOPPED,
    _S.ERROR: OpenHandsStatus.ERROR,
    _S.ARCHIVED: OpenHandsStatus.ARCHIVED,
}

# openhands/runtime/runtime_status.py: what the frontend shows for the sandbox, by status.
OPENHANDS_RUNTIME_STATUS: dict[ConversationStatus, str | None] = {
    _S.QUEUED: None,
    _S.STARTING: "STATUS$STARTING_RUNTIME",
    _S.RUNNING: "STATUS$READY",
    _S.PAUSED: "STATUS$READY",
    _S.STOPPED: "STATUS$STOPPED",
    _S.FINISHED: "STATUS$STOPPED",
    _S.ERROR: "STATUS$ERROR",
    _S.ARCHIVED: "STATUS$STOPPED",
}


class ConversationTrigger(enum.StrEnum):
    """openhands/storage/data_models/conversation_metadata.py: what started a conversation.
    Every Taskbus request carries an API key, which OpenHands records as `openhands_api`."""

    RESOLVER = "resolver"
    GUI = "gui"
    SUGGESTED_TASK = "suggested_task"
    REMOTE_API_KEY = "openhands_api"
    SLACK = "slack"
    MICROAGENT_MANAGEMENT = "microagent_management"
    JIRA = "jira"
    JIRA_DC = "jira_dc"
    LINEAR = "linear"


def conversation_trigger(spec: ConversationSpec) -> ConversationTrigger:
    """What started a conversation, as OpenHands' `new_conversation` decides it."""
    if spec.suggested_task is not None:
        return ConversationTrigger.SUGGESTED_TASK
    if spec.create_microagent is not None:
        return ConversationTrigger.MICROAGENT_MANAGEMENT
    return ConversationTrigger.REMOTE_API_KEY


# What the agent is asked to do for each kind of OpenHands suggested task (OpenHands writes
# these from templates in openhands/integrations/templates/suggested_task/).
_TASK_PROMPTS = {
    "MERGE_CONFLICTS": "Resolve the merge conflicts of {kind} #{number} ({title}) in {repo}.",
    "FAILING_CHECKS": "Fix the failing checks of {kind} #{number} ({title}) in {repo}.",
    "UNRESOLVED_COMMENTS": "Answer the open comments on {kind} #{number} ({title}) in {repo}.",
    "OPEN_ISSUE": "Resolve issue #{number} ({title}) in {repo}.",
    "OPEN_PR": "Review and finish {kind} #{number} ({title}) in {repo}.",
    "CREATE_MICROAGENT": "Write a microagent for {repo}: {title} (#{number}).",
}


def suggested_task_prompt(task: SuggestedTask) -> str:
    """The first user message of a conversation started from a suggested task."""
    kind = "merge request" if task.git_provider == "gitlab" else "pull request"
    return _TASK_PROMPTS[task.task_type].format(
        kind=kind, number=task.issue_number, title=task.title, repo=task.repo
    )
