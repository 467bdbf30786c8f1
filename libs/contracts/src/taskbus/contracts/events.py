"""The facts of a conversation. Each event type is one msgspec Struct tagged by `kind`.

Versioning: fields are only ever added with defaults; a breaking change is a new kind. A payload
whose kind this version does not know decodes to `UnknownEvent`, which keeps it whole.
"""

from __future__ import annotations

import enum
import typing
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import msgspec

from taskbus.contracts.runners import RunnerId
from taskbus.contracts.specs import ConversationSpec, GitProvider, MCPConfig, Resources, Timeouts
from taskbus.contracts.status import AgentState, ConversationStatus, RuntimeStatus

UNASSIGNED_ID = -1


def utc_now() -> datetime:
    return datetime.now(UTC)


class EventSource(enum.StrEnum):
    USER = "user"
    AGENT = "agent"
    ENVIRONMENT = "environment"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag=True):
    """Envelope common to every event; `id` is dense per conversation and set by the appender."""

    conversation_id: str
    source: EventSource
    id: int = UNASSIGNED_ID
    timestamp: datetime = msgspec.field(default_factory=utc_now)
    cause: int | None = None

    # OpenHands' name for this event in its `action` / `observation` field, if it has one.
    openhands_action: ClassVar[str | None] = None
    openhands_observation: ClassVar[str | None] = None

    @property
    def kind(self) -> str:
        return type(self).__name__


# --- conversation lifecycle -------------------------------------------------------------------


class ConversationCreated(Event):
    user_id: str
    spec: ConversationSpec
    title: str


class ConversationStatusChanged(Event):
    status: ConversationStatus
    reason: str = ""


class AgentStateChanged(Event):
    openhands_observation = "agent_state_changed"
    agent_state: AgentState
    reason: str = ""


class ConversationDeleted(Event):
    reason: str = ""


class ConversationRenamed(Event):
    """The user gave the conversation a new title."""

    title: str


class ConversationRejected(Event):
    """Session-manager refused to create or start the conversation (e.g. `queue_full`: the user
    has as many queued conversations as the operator allows). A refused creation leaves this as
    the conversation's only event: the id is used up, and the gateway answers the create 429."""

    user_id: str
    reason: str
    detail: str = ""


# --- runtime ----------------------------------------------------------------------------------


class RuntimeRequested(Event):
    user_id: str
    repository: str | None = None
    selected_branch: str | None = None
    resources: Resources = Resources()
    timeouts: Timeouts = Timeouts()
    # Which of the user's provider tokens clones `repository` (an `owner/name` resolves to that
    # provider's URL), and the MCP servers to start in the sandbox (secrets in it are sealed).
    git_provider: GitProvider | None = None
    mcp_config: MCPConfig | None = None
    # The runner the sandbox is placed on: session-manager chose one with room. Its actions go
    # to that runner's own subject (contracts/runner_work.py).
    runner_id: RunnerId | None = None


class RuntimeLost(Event):
    """The runner holding the conversation's sandbox stopped sending heartbeats: what ran there
    is gone. Its conversation restarts on another runner when workspaces are on shared storage,
    and fails (`runtime_lost`) otherwise; the runner, if it returns, gives the sandbox back."""

    runner_id: RunnerId
    reason: str


class RuntimeStatusChanged(Event):
    status: RuntimeStatus
    reason: str = ""
    backend: str = ""
    sandbox_id: str = ""
    workspace: str = ""


class RuntimeControl(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


class RuntimeControlRequested(Event):
    """Session-manager asks the runner to pause, resume or remove the sandbox."""

    action: RuntimeControl
    reason: str = ""


# --- actions ----------------------------------------------------------------------------------


class MessageAction(Event):
    openhands_action = "message"
    content: str
    image_urls: list[str] = []
    wait_for_response: bool = False


class CmdRunAction(Event):
    openhands_action = "run"
    command: str
    is_input: bool = False
    blocking: bool = False
    timeout: float | None = None
    cwd: str | None = None
    thought: str = ""
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


class FileReadAction(Event):
    openhands_action = "read"
    path: str
    view_range: list[int] | None = None
    thought: str = ""
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


class FileWriteAction(Event):
    openhands_action = "write"
    path: str
    content: str
    thought: str = ""
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


FileEditCommand = Literal["view", "create", "str_replace", "insert", "undo_edit"]


class FileEditAction(Event):
    openhands_action = "edit"
    command: FileEditCommand
    path: str
    file_text: str | None = None
    old_str: str | None = None
    new_str: str | None = None
    insert_line: int | None = None
    view_range: list[int] | None = None
    thought: str = ""
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


TaskStatus = Literal["todo", "in_progress", "done"]


class TaskItem(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    title: str
    status: TaskStatus = "todo"
    notes: str = ""
    # Ids of items of the same plan that must be done before this one can be.
    depends_on: list[str] = []


class TaskTrackingAction(Event):
    openhands_action = "task_tracking"
    command: Literal["plan", "view"]
    task_list: list[TaskItem] = []
    thought: str = ""
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


class ThinkAction(Event):
    openhands_action = "think"
    thought: str
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


class AgentFinishAction(Event):
    openhands_action = "finish"
    final_thought: str = ""
    outputs: dict[str, Any] = {}
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call as the LLM made it, before it becomes an action."""

    id: str
    name: str
    arguments: str  # the JSON text as the LLM sent it, valid or not


class ToolCallsQueued(Event):
    """The LLM asked for several tool calls in one response. They run one at a time, in order:
    each becomes an action (with `cause` = this event's id) once the one before it is answered,
    and those not yet released are dropped if the agent stops, finishes or errs."""

    calls: list[ToolCall]
    thought: str = ""  # the response's text, carried by the first released action
    response_id: str = ""


# --- observations -----------------------------------------------------------------------------


class CommandTimeout(enum.StrEnum):
    NONE = "none"
    SOFT = "soft"  # no new output for no_change_seconds; the process keeps running
    HARD = "hard"  # command_seconds elapsed; the process group was killed


class CmdOutputChunk(Event):
    """Output of a still-running command, streamed before its observation."""

    content: str
    seq: int = 0


class CmdOutputObservation(Event):
    openhands_observation = "run"
    content: str
    command: str
    exit_code: int = -1
    timed_out: CommandTimeout = CommandTimeout.NONE
    cwd: str = ""
    truncated_bytes: int = 0


class FileReadObservation(Event):
    openhands_observation = "read"
    path: str
    content: str
    is_binary: bool = False


class FileWriteObservation(Event):
    openhands_observation = "write"
    path: str
    content: str = ""


class FileEditObservation(Event):
    openhands_observation = "edit"
    path: str
    content: str
    diff: str = ""
    prev_exist: bool = True


class TaskTrackingObservation(Event):
    openhands_observation = "task_tracking"
    command: Literal["plan", "view"]
    content: str
    task_list: list[TaskItem] = []


class ErrorObservation(Event):
    """A typed failure: `code` is machine-readable (e.g. `clone_failed`, `llm_auth`)."""

    openhands_observation = "error"
    content: str
    code: str = ""


class LLMMetrics(Event):
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    accumulated_cost: float = 0.0
    latency_ms: float = 0.0
    response_id: str = ""


class LLMWaiting(Event):
    """The agent's LLM call is still unanswered: appended every `llm_heartbeat_seconds` while
    an attempt waits, so a slow or hung model is visible. The attempt ends at `timeout_seconds`;
    after the last of `attempts` the conversation is in ERROR with reason `llm_timeout`."""

    elapsed_seconds: float  # since this attempt began
    attempt: int  # 1-based
    attempts: int  # the most that will be made
    timeout_seconds: float


class ActionProposed(Event):
    """A risky action chosen in confirmation mode: recorded, but not executable until the user
    confirms it (then the action itself is appended with `cause` = this event's id)."""

    proposed: CmdRunAction | FileWriteAction | FileEditAction | MCPAction


class ConfirmationRequested(Event):
    action_id: int  # the id of the ActionProposed (or action) waiting for the user


class ConfirmationGiven(Event):
    action_id: int
    confirmed: bool
    # Why the user rejected it: a message sent while the action awaited the answer.
    reason: str = ""


class CondensationAction(Event):
    """The agent's history was condensed: events `forgotten_start_id`..`forgotten_end_id`
    (inclusive) are no longer sent to the LLM; `summary` stands in for them."""

    openhands_action = "condensation"
    forgotten_start_id: int
    forgotten_end_id: int
    summary: str = ""


# --- MCP tools (issue 10) -----------------------------------------------------------------------


class MCPTool(msgspec.Struct, frozen=True, kw_only=True):
    """One tool an MCP server offers, as the runtime listed it at start."""

    server: str  # the server's name (a stdio server's `name`, a remote server's URL host)
    name: str  # the name offered to the LLM: unique in the conversation, `[A-Za-z0-9_-]{1,64}`
    tool: str  # the tool's own name on its server
    description: str = ""
    input_schema: dict[str, Any] = {}


class MCPToolsListed(Event):
    """The runtime started the conversation's MCP servers (inside its sandbox) and lists the
    tools they offer; a server that failed is an `ErrorObservation` (`mcp_server_failed`) beside
    it, and is simply absent here."""

    tools: list[MCPTool] = []


class MCPAction(Event):
    """The agent calls an MCP tool (`name` as listed in `MCPToolsListed`)."""

    openhands_action = "call_tool_mcp"
    name: str
    arguments: dict[str, Any] = {}
    thought: str = ""
    tool_call_id: str = ""  # the LLM's id for the tool call that produced this action


class MCPObservation(Event):
    """What the MCP tool answered; `is_error` when the tool reported a failure."""

    openhands_observation = "mcp"
    name: str
    content: str
    arguments: dict[str, Any] = {}
    is_error: bool = False


# --- resources (issue 10) -----------------------------------------------------------------------


class ResourceUsage(Event):
    """The sandbox's use of the host, sampled every `usage_interval_seconds` while it runs:
    from its cgroup (docker, or local under a cgroup) or its process tree (local without)."""

    cpu_seconds: float = 0.0  # CPU time used since the sandbox started
    memory_bytes: int = 0  # now
    memory_peak_bytes: int = 0  # the most it has held since it started
    pids: int = 0
    disk_bytes: int = 0  # the workspace's size
    measured_by: str = ""  # where the figures come from: "cgroup", "docker", "process-tree"


# --- task dependencies (issue 10) ---------------------------------------------------------------


class DependencyOutcome(msgspec.Struct, frozen=True, kw_only=True):
    conversation_id: str
    status: ConversationStatus
    title: str = ""
    final_message: str = ""  # the agent's final thought or last message, shortened


class DependenciesResolved(Event):
    """Every conversation this one `depends_on` has ended: what they came to. Appended before the
    conversation starts (all FINISHED) or fails (`dependency_failed`); the agent reads the
    outcomes as context."""

    outcomes: list[DependencyOutcome]
    failed: bool = False


AnyEvent = (
    ConversationCreated
    | ConversationStatusChanged
    | AgentStateChanged
    | ConversationDeleted
    | ConversationRenamed
    | ConversationRejected
    | RuntimeRequested
    | RuntimeLost
    | RuntimeStatusChanged
    | RuntimeControlRequested
    | MessageAction
    | CmdRunAction
    | FileReadAction
    | FileWriteAction
    | FileEditAction
    | TaskTrackingAction
    | ThinkAction
    | AgentFinishAction
    | ToolCallsQueued
    | CmdOutputChunk
    | CmdOutputObservation
    | FileReadObservation
    | FileWriteObservation
    | FileEditObservation
    | TaskTrackingObservation
    | ErrorObservation
    | LLMMetrics
    | LLMWaiting
    | ConfirmationRequested
    | ConfirmationGiven
    | ActionProposed
    | CondensationAction
    | MCPToolsListed
    | MCPAction
    | MCPObservation
    | ResourceUsage
    | DependenciesResolved
)

EVENT_TYPES: dict[str, type[Event]] = {t.__name__: t for t in typing.get_args(AnyEvent)}

# Actions the runtime executes and answers with an observation.
EXECUTABLE_ACTIONS: tuple[type[Event], ...] = (
    CmdRunAction,
    FileReadAction,
    FileWriteAction,
    FileEditAction,
    MCPAction,
)


class UnknownEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event of a kind this version does not know: kept whole and passed through."""

    kind: str
    conversation_id: str
    id: int
    payload: msgspec.Raw


class _Envelope(msgspec.Struct, kw_only=True):
    kind: str
    conversation_id: str
    id: int = UNASSIGNED_ID


_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_encoder = msgspec.json.Encoder()


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> AnyEvent | UnknownEvent:
    """Decode one event; a valid envelope of an unknown kind becomes `UnknownEvent`.

    Raises `msgspec.ValidationError` / `msgspec.DecodeError` for anything else.
    """
    envelope = _envelope_decoder.decode(data)
    if envelope.kind not in EVENT_TYPES:
        return UnknownEvent(
            kind=envelope.kind,
            conversation_id=envelope.conversation_id,
            id=envelope.id,
            payload=msgspec.Raw(data),
        )
    return _event_decoder.decode(data)
