"""File actions (read, write, the `str_replace_editor` commands) over any sandbox's files."""

from __future__ import annotations

from typing import Any

from taskbus.contracts.events import (
    Event,
    EventSource,
    FileEditAction,
    FileEditObservation,
    FileReadAction,
    FileReadObservation,
    FileWriteAction,
    FileWriteObservation,
)
from taskbus.runtime_runner import editing
from taskbus.runtime_runner.output import OutputCap
from taskbus.runtime_runner.sandbox import ActionError, Sandbox

_TREE_DEPTH = 2


def reply_to(action: Event) -> dict[str, Any]:
    """Envelope fields of the environment's answer to `action`."""
    return {
        "conversation_id": action.conversation_id,
        "source": EventSource.ENVIRONMENT,
        "cause": action.id,
    }


class FileActions:
    """Carries out file actions in one sandbox; keeps that sandbox's undo history."""

    def __init__(self, sandbox: Sandbox, max_output_bytes: int) -> None:
        self._sandbox = sandbox
        self._max_output_bytes = max_output_bytes
        self._history = editing.EditHistory()

    def _capped(self, text: str) -> str:
        cap = OutputCap(self._max_output_bytes)
        cap.append(text.encode())
        return cap.text()

    async def _read_text(self, path: str) -> str:
        data = await self._sandbox.read_bytes(path)
        if editing.is_binary(data):
            raise ActionError("binary_file", f"{path} is a binary file and cannot be edited")
        return data.decode(errors="replace")

    async def _write_text(self, path: str, text: str) -> None:
        await self._sandbox.write_bytes(path, text.encode())

    async def read(self, action: FileReadAction) -> FileReadObservation:
        data = await self._sandbox.read_bytes(action.path)
        if editing.is_binary(data):
            return FileReadObservation(
                **reply_to(action),
                path=action.path,
                content=f"[binary file, {len(data)} bytes]",
                is_binary=True,
            )
        try:
            lines, _ = editing.select_lines(data.decode(errors="replace"), action.view_range)
        except editing.EditError as error:
            raise ActionError("invalid_view_range", str(error)) from None
        content = "\n".join(lines) + ("\n" if lines else "")
        return FileReadObservation(
            **reply_to(action), path=action.path, content=self._capped(content)
        )

    async def write(self, action: FileWriteAction) -> FileWriteObservation:
        if await self._sandbox.exists(action.path) and not await self._sandbox.is_dir(action.path):
            previous = await self._sandbox.read_bytes(action.path)
            if not editing.is_binary(previous):
                self._history.record(
                    self._sandbox.resolve(action.path), previous.decode(errors="replace")
                )
        data = action.content.encode()
        await self._sandbox.write_bytes(action.path, data)
        return FileWriteObservation(
            **reply_to(action),
            path=action.path,
            content=f"Wrote {len(data)} bytes to {action.path}.",
        )

    async def edit(self, action: FileEditAction) -> FileEditObservation:
        try:
            return await self._edit(action)
        except editing.EditError as error:
            raise ActionError("edit_failed", str(error)) from None

    async def _edit(self, action: FileEditAction) -> FileEditObservation:
        """`create` makes missing parent directories, as OpenHands' editor does (models rely on
        it); the path is checked against the workspace all the same. The other commands need
        the file, so its canonical path keys the undo history."""
        path = action.path
        match action.command:
            case "view":
                return await self._view(action)
            case "create":
                if action.file_text is None:
                    raise editing.EditError("Parameter `file_text` is required for command: create")
                if await self._sandbox.exists(path):
                    raise editing.EditError(
                        f"File already exists at: {path}. Cannot overwrite files using command "
                        "`create`."
                    )
                await self._write_text(path, action.file_text)
                return FileEditObservation(
                    **reply_to(action),
                    path=path,
                    content=f"File created successfully at: {path}",
                    diff=editing.unified_diff(path, "", action.file_text),
                    prev_exist=False,
                )
            case "str_replace" | "insert":
                before = await self._read_text(path)
                if action.command == "str_replace":
                    if action.old_str is None:
                        raise editing.EditError("Parameter `old_str` is required for str_replace")
                    edit = editing.str_replace(before, action.old_str, action.new_str or "")
                else:
                    if action.insert_line is None or action.new_str is None:
                        raise editing.EditError(
                            "Parameters `insert_line` and `new_str` are required for insert"
                        )
                    edit = editing.insert(before, action.insert_line, action.new_str)
                self._history.record(self._sandbox.resolve(path), before)
                await self._write_text(path, edit.text)
                changed = editing.snippet(edit.text, edit.first_line, edit.last_line)
                content = (
                    f"The file {path} has been edited. Here's the result of running `cat -n` on a "
                    f"snippet of {path}:\n{changed}\n"
                    "Review the changes and make sure they are as expected."
                )
                return FileEditObservation(
                    **reply_to(action),
                    path=path,
                    content=self._capped(content),
                    diff=self._capped(editing.unified_diff(path, before, edit.text)),
                )
            case "undo_edit":
                current = await self._read_text(path)
                previous = self._history.undo(self._sandbox.resolve(path))
                await self._write_text(path, previous)
                return FileEditObservation(
                    **reply_to(action),
                    path=path,
                    content=f"Last edit to {path} undone successfully.",
                    diff=self._capped(editing.unified_diff(path, current, previous)),
                )

    async def _view(self, action: FileEditAction) -> FileEditObservation:
        path = action.path
        if await self._sandbox.is_dir(path):
            entries = await self._sandbox.list_tree(path, _TREE_DEPTH)
            content = (
                f"Here's the files and directories up to {_TREE_DEPTH} levels deep in {path}, "
                "excluding hidden items:\n" + "\n".join(entries)
            )
        else:
            text = await self._read_text(path)
            content = f"Here's the result of running `cat -n` on {path}:\n" + editing.view(
                text, action.view_range
            )
        return FileEditObservation(**reply_to(action), path=path, content=self._capped(content))
