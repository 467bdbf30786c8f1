"""Which action each conversation's sandbox was carrying out, kept on disk so that a runner
restarted after a crash knows the action it finds unanswered was cut off midway, and answers it
with an error instead of running it again: a command may already have had its effects."""

from __future__ import annotations

import contextlib
from pathlib import Path


class InFlightJournal:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def begin(self, conversation_id: str, action_id: int) -> None:
        (self._directory / conversation_id).write_text(str(action_id))

    def end(self, conversation_id: str) -> None:
        (self._directory / conversation_id).unlink(missing_ok=True)

    def interrupted(self, conversation_id: str) -> int | None:
        """The action a previous runner began for this conversation and never answered."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self._directory / conversation_id).read_text())
        return None
