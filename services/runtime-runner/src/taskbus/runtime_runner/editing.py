"""The pure part of the file editor (OpenHands' `str_replace_editor`): no I/O here.

Callers read a file, call these functions on its text, and write the result back; the functions
only compute new text, views, snippets and diffs, and raise `EditError` with a message meant for
the agent when an edit cannot be applied.
"""

from __future__ import annotations

import difflib
from collections import deque

import msgspec

SNIPPET_CONTEXT_LINES = 4
_BINARY_SNIFF_BYTES = 8192


class EditError(ValueError):
    """An edit that cannot be applied; the message tells the agent why."""


def is_binary(data: bytes) -> bool:
    """Binary if it has a NUL byte or is not UTF-8 near its start (as `git` and `grep` guess)."""
    sample = data[:_BINARY_SNIFF_BYTES]
    if b"\0" in sample:
        return True
    try:
        sample.decode()
    except UnicodeDecodeError as error:
        # A multi-byte character cut at the end of the sample is still text.
        return error.start < len(sample) - 3
    return False


def select_lines(text: str, view_range: list[int] | None) -> tuple[list[str], int]:
    """The lines of `text` in `view_range` ([first, last], 1-based, last -1 = end) and the first
    line's number."""
    lines = _lines(text)
    if view_range is None:
        return lines, 1
    if len(view_range) != 2:
        raise EditError("view_range must be [first_line, last_line]")
    first, last = view_range
    if not 1 <= first <= max(len(lines), 1):
        raise EditError(f"view_range first line {first} is outside the file's 1..{len(lines)}")
    if last == -1:
        last = len(lines)
    if last < first:
        raise EditError(f"view_range last line {last} is before its first line {first}")
    return lines[first - 1 : last], first


def _lines(text: str) -> list[str]:
    """Lines without their newlines; a final newline does not start another line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def numbered(lines: list[str], first_line: int) -> str:
    """Lines prefixed with their numbers, as `cat -n` prints them."""
    return "\n".join(f"{number:6}\t{line}" for number, line in enumerate(lines, first_line))


def view(text: str, view_range: list[int] | None = None) -> str:
    lines, first = select_lines(text, view_range)
    return numbered(lines, first)


def snippet(text: str, first_line: int, last_line: int) -> str:
    """The edited lines with some context around them, numbered."""
    lines = text.split("\n")
    start = max(first_line - SNIPPET_CONTEXT_LINES, 1)
    end = min(last_line + SNIPPET_CONTEXT_LINES, len(lines))
    return numbered(lines[start - 1 : end], start)


class Edit(msgspec.Struct, frozen=True):
    """The result of one edit: the new text and the 1-based line span it touched."""

    text: str
    first_line: int
    last_line: int


def str_replace(text: str, old: str, new: str) -> Edit:
    """Replace the one occurrence of `old`; zero or several occurrences are errors."""
    if not old:
        raise EditError("old_str must not be empty")
    count = text.count(old)
    if count == 0:
        raise EditError(f"No replacement was performed, old_str `{old}` did not appear verbatim.")
    if count > 1:
        starts = _occurrence_lines(text, old)
        raise EditError(
            f"No replacement was performed. Multiple occurrences of old_str `{old}` in lines "
            f"{starts}. Please ensure it is unique."
        )
    index = text.index(old)
    first_line = text.count("\n", 0, index) + 1
    return Edit(text.replace(old, new, 1), first_line, first_line + new.rstrip("\n").count("\n"))


def _occurrence_lines(text: str, needle: str) -> list[int]:
    lines = []
    index = text.find(needle)
    while index >= 0:
        lines.append(text.count("\n", 0, index) + 1)
        index = text.find(needle, index + 1)
    return lines


def insert(text: str, after_line: int, new: str) -> Edit:
    """Insert `new` after line `after_line` (0 inserts at the top)."""
    lines = _lines(text)
    if not 0 <= after_line <= len(lines):
        raise EditError(
            f"insert_line {after_line} is outside the valid range 0..{len(lines)} of the file"
        )
    new_lines = _lines(new) or [""]
    result = lines[:after_line] + new_lines + lines[after_line:]
    trailing = "\n" if text.endswith("\n") or not text else ""
    return Edit("\n".join(result) + trailing, after_line + 1, after_line + len(new_lines))


def unified_diff(path: str, before: str, after: str) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"a/{path}",
            tofile=f"b/{path}",
        )
    )


class EditHistory:
    """Previous contents of each edited file, most recent last, for `undo_edit`."""

    def __init__(self, depth: int = 20) -> None:
        self._depth = depth
        self._versions: dict[str, deque[str]] = {}

    def record(self, path: str, previous: str) -> None:
        self._versions.setdefault(path, deque(maxlen=self._depth)).append(previous)

    def undo(self, path: str) -> str:
        versions = self._versions.get(path)
        if not versions:
            raise EditError(f"No edit history found for {path}.")
        return versions.pop()
