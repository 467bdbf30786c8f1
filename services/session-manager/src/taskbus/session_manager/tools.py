"""The CodeAct tools offered to the LLM, and the two-way mapping between tool calls and actions.

Beside the built-ins, the LLM is offered the tools the conversation's MCP servers listed
(`MCPToolsListed`, named `<server>_<tool>` by the runtime): a call of one is an `MCPAction`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from taskbus.contracts.events import (
    ActionProposed,
    AgentFinishAction,
    CmdRunAction,
    ErrorObservation,
    Event,
    EventSource,
    FileEditAction,
    FileEditCommand,
    FileReadAction,
    FileWriteAction,
    MCPAction,
    MCPTool,
    TaskItem,
    TaskTrackingAction,
    ThinkAction,
    ToolCall,
)

EXECUTE_BASH = "execute_bash"
STR_REPLACE_EDITOR = "str_replace_editor"
TASK_TRACKER = "task_tracker"
THINK = "think"
FINISH = "finish"
INVALID_TOOL_CALL = "invalid_tool_call"  # the code of the error answering a malformed call


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> Any:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


TOOLS: list[dict[str, Any]] = [
    _function(
        EXECUTE_BASH,
        "Run a bash command in the sandbox's persistent shell (cwd and env persist). If a "
        "command is still running when it returns, send more input with is_input=true, an "
        "empty command to wait for more output, or C-c to interrupt it.",
        {
            "command": {"type": "string", "description": "The command, or input to a process."},
            "is_input": {"type": "boolean", "description": "Send as input to the running process."},
            "timeout": {"type": "number", "description": "Hard timeout in seconds (optional)."},
        },
        ["command"],
    ),
    _function(
        STR_REPLACE_EDITOR,
        "View, create and edit files. `view` shows a file (with line numbers) or lists a "
        "directory; `create` writes file_text; `str_replace` replaces old_str (which must occur "
        "exactly once) by new_str; `insert` adds new_str after insert_line; `undo_edit` reverts "
        "the last edit of path.",
        {
            "command": {
                "type": "string",
                "enum": ["view", "create", "str_replace", "insert", "undo_edit"],
            },
            "path": {"type": "string", "description": "Path of the file or directory."},
            "file_text": {"type": "string"},
            "old_str": {"type": "string"},
            "new_str": {"type": "string"},
            "insert_line": {"type": "integer"},
            "view_range": {"type": "array", "items": {"type": "integer"}},
        },
        ["command", "path"],
    ),
    _function(
        TASK_TRACKER,
        "Keep a visible plan: `plan` replaces the task list, `view` shows it. Update statuses "
        "(todo, in_progress, done) as work progresses; an item done before its depends_on is "
        "refused.",
        {
            "command": {"type": "string", "enum": ["plan", "view"]},
            "task_list": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "string", "enum": ["todo", "in_progress", "done"]},
                        "notes": {"type": "string"},
                        "depends_on": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["id", "title", "status"],
                },
            },
        },
        ["command"],
    ),
    _function(
        THINK,
        "Think about something without acting; the thought is logged.",
        {"thought": {"type": "string"}},
        ["thought"],
    ),
    _function(
        FINISH,
        "Signal that the task is complete, with a summary for the user.",
        {"message": {"type": "string"}},
        ["message"],
    ),
]


class _Bash(msgspec.Struct, forbid_unknown_fields=True):
    command: str
    is_input: bool = False
    timeout: float | None = None


class _Editor(msgspec.Struct, forbid_unknown_fields=True):
    command: FileEditCommand
    path: str
    file_text: str | None = None
    old_str: str | None = None
    new_str: str | None = None
    insert_line: int | None = None
    view_range: list[int] | None = None


class _Tracker(msgspec.Struct, forbid_unknown_fields=True):
    command: Literal["plan", "view"]
    task_list: list[TaskItem] = []


class _Think(msgspec.Struct, forbid_unknown_fields=True):
    thought: str


class _Finish(msgspec.Struct, forbid_unknown_fields=True):
    message: str = ""


class InvalidToolCall(ValueError):
    """The LLM called an unknown tool or with arguments that do not fit; it is told and retries."""


def offered_tools(mcp_tools: Sequence[MCPTool]) -> list[dict[str, Any]]:
    """The built-ins, then the conversation's MCP tools (their own JSON schemas)."""
    return [
        *TOOLS,
        *(
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description or f"{tool.tool} (MCP server {tool.server})",
                    "parameters": tool.input_schema or {"type": "object", "properties": {}},
                },
            }
            for tool in mcp_tools
        ),
    ]


def action_from_tool_call(
    conversation_id: str,
    name: str,
    arguments: str,
    call_id: str,
    thought: str,
    mcp_tools: Sequence[MCPTool] = (),
) -> Event:
    """The action an LLM tool call asks for (source agent, not yet appended)."""
    common: dict[str, Any] = {
        "conversation_id": conversation_id,
        "source": EventSource.AGENT,
        "tool_call_id": call_id,
    }
    try:
        raw = json.loads(arguments or "{}")
        match name:
            case "execute_bash":
                bash = msgspec.convert(raw, _Bash, strict=False)
                return CmdRunAction(
                    **common,
                    command=bash.command,
                    is_input=bash.is_input,
                    timeout=bash.timeout,
                    thought=thought,
                )
            case "str_replace_editor":
                edit = msgspec.convert(raw, _Editor, strict=False)
                return FileEditAction(**common, **msgspec.structs.asdict(edit), thought=thought)
            case "task_tracker":
                tracker = msgspec.convert(raw, _Tracker, strict=False)
                return TaskTrackingAction(
                    **common,
                    command=tracker.command,
                    task_list=tracker.task_list,
                    thought=thought,
                )
            case "think":
                think = msgspec.convert(raw, _Think, strict=False)
                return ThinkAction(**common, thought=think.thought)
            case "finish":
                finish = msgspec.convert(raw, _Finish, strict=False)
                return AgentFinishAction(**common, final_thought=finish.message or thought)
            case _ if any(tool.name == name for tool in mcp_tools):
                if not isinstance(raw, dict):
                    raise InvalidToolCall(f"the arguments of tool {name!r} must be a JSON object")
                return MCPAction(**common, name=name, arguments=raw, thought=thought)
    except (json.JSONDecodeError, msgspec.ValidationError) as error:
        raise InvalidToolCall(f"invalid arguments for tool {name!r}: {error}") from error
    names = [*_TOOL_NAMES, *(tool.name for tool in mcp_tools)]
    raise InvalidToolCall(f"unknown tool {name!r}; the tools are {', '.join(names)}")


def event_for_call(
    conversation_id: str,
    call: ToolCall,
    thought: str,
    cause: int | None = None,
    mcp_tools: Sequence[MCPTool] = (),
) -> Event:
    """The action `call` asks for, or the error that tells the LLM why it is not valid."""
    try:
        action = action_from_tool_call(
            conversation_id, call.name, call.arguments, call.id, thought, mcp_tools
        )
    except InvalidToolCall as error:
        return ErrorObservation(
            conversation_id=conversation_id,
            source=EventSource.ENVIRONMENT,
            cause=cause,
            content=str(error),
            code=INVALID_TOOL_CALL,
        )
    return msgspec.structs.replace(action, cause=cause)


_TOOL_NAMES = [tool["function"]["name"] for tool in TOOLS]
_EDITOR_ARGUMENTS = _Editor.__struct_fields__


def tool_call_of(action: Event) -> tuple[str, dict[str, Any]] | None:
    """The (tool name, arguments) that stands for `action` in the LLM's history."""
    match action:
        case ActionProposed():
            return tool_call_of(action.proposed)
        case CmdRunAction():
            args: dict[str, Any] = {"command": action.command}
            if action.is_input:
                args["is_input"] = True
            if action.timeout is not None:
                args["timeout"] = action.timeout
            return EXECUTE_BASH, args
        case FileEditAction():
            fields = msgspec.structs.asdict(action)
            args = {k: fields[k] for k in _EDITOR_ARGUMENTS if fields[k] is not None}
            return STR_REPLACE_EDITOR, args
        case FileReadAction():
            args = {"command": "view", "path": action.path}
            if action.view_range is not None:
                args["view_range"] = action.view_range
            return STR_REPLACE_EDITOR, args
        case FileWriteAction():
            create = {"command": "create", "path": action.path, "file_text": action.content}
            return STR_REPLACE_EDITOR, create
        case TaskTrackingAction():
            tasks = [msgspec.to_builtins(item) for item in action.task_list]
            return TASK_TRACKER, {"command": action.command, "task_list": tasks}
        case ThinkAction():
            return THINK, {"thought": action.thought}
        case AgentFinishAction():
            return FINISH, {"message": action.final_thought}
        case MCPAction():
            return action.name, action.arguments
    return None


def render_task_list(tasks: tuple[TaskItem, ...] | list[TaskItem]) -> str:
    """A readable plan, shown to the LLM and to people."""
    if not tasks:
        return "The task list is empty."
    marks = {"todo": "[ ]", "in_progress": "[~]", "done": "[x]"}
    lines = [f"{len(tasks)} tasks:"]
    for item in tasks:
        line = f"{marks[item.status]} {item.id}. {item.title} ({item.status})"
        if item.depends_on:
            line += f" [after {', '.join(item.depends_on)}]"
        lines.append(f"{line} - {item.notes}" if item.notes else line)
    return "\n".join(lines)
