"""OpenHands' request bodies that become Taskbus commands: rename (PATCH) and add_event.

OpenHands 0.56.0 (openhands/server/routes/manage_conversations.py, conversation.py): PATCH takes
`UpdateConversationRequest` (`title`, 1..200 characters, nothing else); `POST …/events` takes
any event dict and hands it to the agent loop. Taskbus' events are made by its own agent and
runtime, so the only event a client may add is what a client says: a user `MessageAction`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from taskbus.contracts.specs import MAX_NAME_CHARS
from taskbus.gateway.inputs import MessageText
from taskbus.gateway.problems import Problem


class RenameBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """PATCH /api/conversations/{id}: OpenHands' UpdateConversationRequest."""

    title: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]

    def stripped_title(self) -> str:
        """The title as stored (OpenHands strips it); blank is a 422, not an empty title."""
        title = self.title.strip()
        if not title:
            raise Problem(422, "the title is blank", kind="validation-error")
        return title


class _MessageArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenHands' MessageAction fields (its `args`); an unknown one fails there too."""

    content: MessageText
    image_urls: list[str] | None = None
    file_urls: list[str] | None = None
    wait_for_response: bool = False
    security_risk: int = -1


class AddEventBody(msgspec.Struct, frozen=True, kw_only=True):
    """POST /api/conversations/{id}/events: an event as OpenHands' `event_to_dict` writes it.
    Its other top-level keys (`id`, `timestamp`, `message`, `timeout`, ...) are ignored, as
    OpenHands' `event_from_dict` ignores them for an action."""

    action: str | None = None
    observation: str | None = None
    source: str | None = None
    args: dict[str, Any] = msgspec.field(default_factory=dict)

    def user_message(self) -> str:
        """The content of the user message this event is, or a 422 saying why it is not one."""
        if self.action != "message" or self.observation is not None:
            what = f"observation {self.observation!r}" if self.observation else None
            what = what or f"action {self.action!r}"
            raise Problem(
                422,
                f"only a user message can be added ({{'action': 'message', 'args': {{'content':"
                f" ...}}}}); {what} is made by Taskbus' agent and runtime, never by a client",
                kind="validation-error",
                title="Event not accepted",
            )
        if self.source not in (None, "user"):
            raise Problem(
                422,
                f"an added message is the user's, not the {self.source}'s",
                kind="validation-error",
            )
        try:
            args = msgspec.convert(self.args, _MessageArgs)
        except msgspec.ValidationError as error:
            raise Problem(
                422, f"args: {error}", kind="validation-error", title="Invalid request body"
            ) from error
        if args.image_urls or args.file_urls:
            raise Problem(
                422,
                "image_urls and file_urls are taken only by create (POST /api/conversations):"
                " a later message carries text",
                kind="validation-error",
            )
        return args.content
