"""Which action each conversation's sandbox was carrying out, kept on disk so that a runner
restarted after a crash knows the action it finds unanswered was cut off midway, and answers it
with an error instead of running it again: a command may already have had its effects."""

from __future__ import annotations

import contextlib
from pathlib import Path

from taskbus.contracts import subjects


class InFlightJournal:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def begin(self, conversation_id: str, action_id: int) -> None:
        self._entry(conversation_id).write_text(str(action_id))

    def end(self, conversation_id: str) -> None:
        self._entry(conversation_id).unlink(missing_ok=True)

    def _entry(self, conversation_id: str) -> Path:
        return self._directory / subjects.require_conversation_id(conversation_id)

    def entries(self) -> dict[str, int]:
        """conversation id -> the action a previous runner began there and never answered."""
        found: dict[str, int] = {}
        for path in self._directory.iterdir():
            with contextlib.suppress(FileNotFoundError, ValueError):
                found[path.name] = int(path.read_text())
        return found
