"""What the CLI shows, as pure functions of the API's answers (rich renderables, no I/O)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from taskbus.devtools.client import is_final_status_event

PLAN_MARKS = {"todo": "[ ]", "in_progress": "[~]", "done": "[x]"}
PLAN_STYLES = {"todo": "dim", "in_progress": "bold yellow", "done": "green"}
STATUS_STYLES = {
    "RUNNING": "yellow",
    "FINISHED": "green",
    "ERROR": "red",
    "STOPPED": "magenta",
    "PAUSED": "cyan",
    "QUEUED": "blue",
}


def when(value: str | None) -> str:
    """An API time (RFC 3339) in local time, to the minute."""
    if not value:
        return ""
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value


def conversation_table(conversations: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    # The id stays whole, however narrow the terminal: it is copied into the next command.
    widest_id = max(
        (len(str(item.get("conversation_id", ""))) for item in conversations), default=2
    )
    table.add_column("ID", no_wrap=True, min_width=widest_id)
    table.add_column("TITLE", overflow="fold")
    table.add_column("STATUS", no_wrap=True)
    table.add_column("COST", justify="right", no_wrap=True)
    table.add_column("CREATED", overflow="fold")
    table.add_column("UPDATED", overflow="fold")
    for item in conversations:
        status = str(item.get("taskbus_status", ""))
        table.add_row(
            str(item.get("conversation_id", "")),
            str(item.get("title", "")),
            Text(status, style=STATUS_STYLES.get(status, "")),
            f"${float(item.get('accumulated_cost') or 0):.4f}",
            when(item.get("created_at")),
            when(item.get("last_updated_at")),
        )
    return table


def plan_lines(task_list: list[dict[str, Any]]) -> Text:
    """The agent's plan, one item a line with its state: todo / in_progress / done."""
    text = Text()
    for item in task_list:
        status = str(item.get("status", "todo"))
        text.append(f"  {PLAN_MARKS.get(status, '[?]')} ", style=PLAN_STYLES.get(status, ""))
        text.append(f"{item.get('title', '')}", style=PLAN_STYLES.get(status, ""))
        text.append(f"  {status}\n", style="dim")
    text.rstrip()
    return text


def activity(event: dict[str, Any]) -> str | None:
    """What the conversation is doing after `event`; None when it waits on nobody (settled, or
    waiting for the user). The agent acts, the sandbox answers, and between the two the agent
    waits on the LLM."""
    kind = event.get("kind")
    if is_final_status_event(event):
        return None
    if kind == "ConversationStatusChanged" and event.get("status") == "PAUSED":
        return None
    if kind == "AgentStateChanged":
        state = event.get("agent_state")
        if state in ("awaiting_user_input", "awaiting_user_confirmation", "paused"):
            return None
        return "agent thinking (waiting on the LLM)"
    if kind == "ConfirmationRequested":
        return None
    source = event.get("source")
    if source == "agent" and "args" in event and kind != "MessageAction":
        return f"running {kind}"
    if kind in ("CmdOutputChunk", "ResourceUsage"):
        return "running the command"
    if kind == "LLMWaiting":
        return (
            f"waiting on the LLM for {event.get('elapsed_seconds', 0):.0f}s"
            f" (attempt {event.get('attempt')} of {event.get('attempts')},"
            f" {event.get('timeout_seconds', 0):g}s each)"
        )
    return "agent thinking (waiting on the LLM)"


class LiveView:
    """The bottom of `run` / `watch`: the current plan and a spinner saying who is at work."""

    def __init__(self) -> None:
        self.plan: list[dict[str, Any]] = []
        self.doing: str | None = "waiting for the conversation to start"
        self._spinner = Spinner("dots")

    def update(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "TaskTrackingAction":
            task_list = event.get("args", {}).get("task_list")
            if task_list:
                self.plan = list(task_list)
        self.doing = activity(event)

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = []
        if self.plan:
            parts += [Text("plan", style="bold"), plan_lines(self.plan)]
        if self.doing is not None:
            self._spinner.update(text=Text(self.doing, style="cyan"))
            parts.append(self._spinner)
        return Group(*parts)
