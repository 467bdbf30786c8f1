"""Value types shared by commands and events: what a conversation asks for, user settings."""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]

# --- size limits ----------------------------------------------------------------------------
# Every string a user can send has a length limit, all of them here. They are sized so that the
# largest command, event and query reply stays below NATS' max_payload (1 MiB by default) even
# when every character takes JSON's worst case of 6 bytes ("\u0001"): a CreateConversation at
# every limit is ~800 KB (checked by tests/security/test_limits.py). Event-store also splits or
# refuses any reply that would still exceed the connection's max_payload.
NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_MESSAGE_CHARS = 100_000  # initial_user_msg, a user message
MAX_INSTRUCTIONS_CHARS = 20_000  # conversation_instructions
MAX_URL_CHARS = 2048  # repository, llm_base_url
MAX_BRANCH_CHARS = 255  # selected_branch (git's own limit on a ref name component)
MAX_NAME_CHARS = 200  # title, git_provider, llm_model
MAX_SECRET_CHARS = 4096  # llm_api_key
MAX_MCP_CONFIG_BYTES = 64 * 1024  # mcp_config, as JSON
MAX_QUERY_TEXT_CHARS = 1000  # free-text search parameters

Message = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)]
# No whitespace or control character: such a string is no URL, and could hide a credential.
Url = Annotated[str, msgspec.Meta(max_length=MAX_URL_CHARS, pattern=r"^[^\x00-\x20\x7f]*$")]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]


class NetworkMode(enum.StrEnum):
    NONE = "none"
    BRIDGE = "bridge"


class ConcurrencyPolicy(enum.StrEnum):
    EVICT_OLDEST = "evict_oldest"
    QUEUE = "queue"


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Time limits of one conversation; None means the operator default."""

    no_change_seconds: PositiveSeconds | None = None
    command_seconds: PositiveSeconds | None = None
    idle_seconds: PositiveSeconds | None = None
    max_duration_seconds: PositiveSeconds | None = None


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sandbox limits asked for; the runtime caps them by the operator's maxima."""

    cpus: Annotated[float, msgspec.Meta(gt=0, le=256)] | None = None
    memory_mb: Annotated[int, msgspec.Meta(ge=16, le=1024 * 1024)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=8, le=1_000_000)] | None = None
    network: NetworkMode | None = None


# Images of a user message, sent to the LLM as image parts: an https URL or a small
# `data:image/...;base64,` URL, in ASCII (the one bus message a command travels in bounds the
# size, and a URL of another scheme could make the LLM client fetch from a private address).
MAX_IMAGES = 8
ImageUrl = Annotated[
    str,
    msgspec.Meta(
        max_length=MAX_URL_CHARS,
        pattern=r"^(https://[\x21-\x7e]+|data:image/[-+.\w]+;base64,[A-Za-z0-9+/=]+)$",
    ),
]
ImageUrls = Annotated[list[ImageUrl], msgspec.Meta(max_length=MAX_IMAGES)]


class GitProvider(enum.StrEnum):
    """Where a repository given as `owner/name` lives, and which of the user's tokens clones it
    (OpenHands' ProviderType, plus `generic`: an https token for any other git host)."""

    GITHUB = "github"
    GITLAB = "gitlab"
    BITBUCKET = "bitbucket"
    AZURE_DEVOPS = "azure_devops"
    GENERIC = "generic"


# --- MCP servers (OpenHands' MCPConfig) ------------------------------------------------------
# Secrets in a config (a remote server's `api_key`, a stdio server's `env` values) are sealed by
# the gateway before the config enters NATS (contracts/secret_box.py), so the log holds only
# `sealed:v1:` tokens; the runner opens them inside the conversation's sandbox start.
MAX_MCP_SERVERS = 16
MCPServerName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
# Room for a sealed secret of MAX_SECRET_CHARS (base64 of nonce + text + tag, and the prefix).
SealedSecret = Annotated[str, msgspec.Meta(max_length=2 * MAX_SECRET_CHARS)]


class MCPRemoteServer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenHands' MCPSSEServerConfig / MCPSHTTPServerConfig."""

    url: Url
    api_key: SealedSecret | None = None
    timeout: PositiveSeconds | None = None


class MCPStdioServer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenHands' MCPStdioServerConfig: a command the user chose, run inside the sandbox."""

    name: MCPServerName
    command: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    args: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(max_length=64)
    ] = []
    env: Annotated[dict[EnvName, SealedSecret], msgspec.Meta(max_length=64)] = {}


RemoteServers = Annotated[list[Url | MCPRemoteServer], msgspec.Meta(max_length=MAX_MCP_SERVERS)]


class MCPConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenHands' MCPConfig: a remote server is a URL or `{url, api_key}`."""

    sse_servers: RemoteServers = []
    shttp_servers: RemoteServers = []
    stdio_servers: Annotated[list[MCPStdioServer], msgspec.Meta(max_length=MAX_MCP_SERVERS)] = []

    def __post_init__(self) -> None:
        """Bounds the whole config (msgspec reports this as invalid)."""
        if len(msgspec.json.encode(self)) > MAX_MCP_CONFIG_BYTES:
            raise ValueError(f"mcp_config is larger than {MAX_MCP_CONFIG_BYTES} bytes as JSON")


# A conversation may wait for at most this many others (`depends_on`).
MAX_DEPENDENCIES = 32
DependencyId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class SuggestedTask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenHands' suggested task (openhands/integrations/service_types.py): the conversation's
    first message is written from it. Its `git_provider` becomes the conversation's, so it is
    one the clone knows (a 422 otherwise, as for the spec's own)."""

    git_provider: GitProvider
    task_type: Literal[
        "MERGE_CONFLICTS",
        "FAILING_CHECKS",
        "UNRESOLVED_COMMENTS",
        "OPEN_ISSUE",
        "OPEN_PR",
        "CREATE_MICROAGENT",
    ]
    repo: Name
    issue_number: Annotated[int, msgspec.Meta(ge=0)]
    title: Name


class CreateMicroagent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenHands' request to write a microagent for `repo`: it names the repository."""

    repo: Name
    git_provider: GitProvider | None = None
    title: Name | None = None


class ConversationSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /api/conversations: OpenHands' InitSessionRequest plus Taskbus' limits."""

    initial_user_msg: Message | None = None
    repository: Url | None = None
    git_provider: GitProvider | None = None
    selected_branch: Annotated[str, msgspec.Meta(max_length=MAX_BRANCH_CHARS)] | None = None
    conversation_instructions: (
        Annotated[str, msgspec.Meta(max_length=MAX_INSTRUCTIONS_CHARS)] | None
    ) = None
    mcp_config: MCPConfig | None = None
    image_urls: ImageUrls = []
    # OpenHands' trajectory to replay: the gateway refuses it (422 saying why), so no command
    # ever carries one.
    replay_json: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)] | None = None
    suggested_task: SuggestedTask | None = None
    create_microagent: CreateMicroagent | None = None
    title: Name | None = None
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0
    max_budget_per_task: Annotated[float, msgspec.Meta(ge=1)] | None = None
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    # None: the user's setting. Session-manager records the value that applied.
    confirmation_mode: bool | None = None
    timeouts: Timeouts = Timeouts()
    resources: Resources = Resources()
    # Conversations (the same user's) that must all FINISH before this one starts.
    depends_on: Annotated[list[DependencyId], msgspec.Meta(max_length=MAX_DEPENDENCIES)] = []


class UserSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-user settings (KV `taskbus_settings`). `llm_api_key` is write-only at the API."""

    llm_model: Name | None = None
    llm_api_key: Annotated[str, msgspec.Meta(max_length=MAX_SECRET_CHARS)] | None = None
    llm_base_url: Url | None = None
    max_budget_per_task: Annotated[float, msgspec.Meta(ge=1)] | None = None
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    max_concurrent_conversations: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    # Defaults of the user's conversations (a request's own value wins).
    no_change_timeout_seconds: PositiveSeconds | None = None
    confirmation_mode: bool = False
    concurrency_policy: ConcurrencyPolicy | None = None
    # MCP servers of the user's conversations whose request names none.
    mcp_config: MCPConfig | None = None
