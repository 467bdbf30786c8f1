"""File actions through every sandbox backend: read, write, the editor, the workspace boundary."""

from __future__ import annotations

import pytest

from taskbus.contracts.events import (
    EventSource,
    FileEditAction,
    FileReadAction,
    FileWriteAction,
)
from taskbus.runtime_runner.files import FileActions
from taskbus.runtime_runner.sandbox import ActionError, CommandRequest, Sandbox

ENVELOPE = {"conversation_id": "c1", "source": EventSource.AGENT, "id": 7}


def files_of(sandbox: Sandbox) -> FileActions:
    return FileActions(sandbox, max_output_bytes=4096)


async def test_write_then_read_whole_and_by_range(sandbox: Sandbox) -> None:
    files = files_of(sandbox)
    written = await files.write(
        FileWriteAction(**ENVELOPE, path="notes/a.txt", content="one\ntwo\nthree\n")
    )
    assert written.cause == 7 and written.source == EventSource.ENVIRONMENT
    whole = await files.read(FileReadAction(**ENVELOPE, path="notes/a.txt"))
    assert whole.content == "one\ntwo\nthree\n"
    assert not whole.is_binary
    middle = await files.read(FileReadAction(**ENVELOPE, path="notes/a.txt", view_range=[2, 2]))
    assert middle.content == "two\n"


async def test_binary_and_missing_files(sandbox: Sandbox) -> None:
    files = files_of(sandbox)
    await sandbox.write_bytes("blob.bin", b"\x00\x01\x02\xff")
    blob = await files.read(FileReadAction(**ENVELOPE, path="blob.bin"))
    assert blob.is_binary
    assert blob.content == "[binary file, 4 bytes]"
    with pytest.raises(ActionError) as missing:
        await files.read(FileReadAction(**ENVELOPE, path="nope.txt"))
    assert missing.value.code == "file_not_found"


async def test_large_file_read_is_capped(sandbox: Sandbox) -> None:
    files = files_of(sandbox)
    await sandbox.write_bytes("big.txt", b"x" * 100_000)
    big = await files.read(FileReadAction(**ENVELOPE, path="big.txt"))
    assert "bytes of output omitted" in big.content
    assert len(big.content) < 4096 + 100


async def test_editor_create_replace_insert_undo(sandbox: Sandbox) -> None:
    files = files_of(sandbox)

    def edit(command: str, **fields: object) -> FileEditAction:
        return FileEditAction(**ENVELOPE, command=command, path="m.py", **fields)  # type: ignore[arg-type]

    created = await files.edit(edit("create", file_text="a = 1\nb = 2\n"))
    assert not created.prev_exist
    assert "+a = 1" in created.diff
    with pytest.raises(ActionError, match="already exists"):
        await files.edit(edit("create", file_text="again"))

    replaced = await files.edit(edit("str_replace", old_str="b = 2", new_str="b = 20"))
    assert "-b = 2\n+b = 20\n" in replaced.diff
    assert "     2\tb = 20" in replaced.content
    with pytest.raises(ActionError) as ambiguous:
        await files.edit(edit("str_replace", old_str=" = ", new_str=" == "))
    assert ambiguous.value.code == "edit_failed"
    assert "Multiple occurrences" in ambiguous.value.message

    await files.edit(edit("insert", insert_line=0, new_str="import os"))
    assert await sandbox.read_bytes("m.py") == b"import os\na = 1\nb = 20\n"
    viewed = await files.edit(edit("view", view_range=[2, 3]))
    assert viewed.content.endswith("     2\ta = 1\n     3\tb = 20")

    undone = await files.edit(edit("undo_edit"))
    assert "-import os" in undone.diff
    await files.edit(edit("undo_edit"))
    assert await sandbox.read_bytes("m.py") == b"a = 1\nb = 2\n"
    with pytest.raises(ActionError, match="No edit history"):
        await files.edit(edit("undo_edit"))


async def test_editor_create_makes_missing_parent_directories(sandbox: Sandbox) -> None:
    """OpenHands' editor creates the parents of a new file, and real models rely on it."""
    files = files_of(sandbox)
    created = await files.edit(
        FileEditAction(**ENVELOPE, command="create", path="notes/deep/a.txt", file_text="hi\n")
    )
    assert not created.prev_exist and "+hi" in created.diff
    assert await sandbox.read_bytes("notes/deep/a.txt") == b"hi\n"
    assert await sandbox.is_dir("notes/deep")
    edited = FileEditAction(
        **ENVELOPE, command="str_replace", path="notes/deep/a.txt", old_str="hi", new_str="ho"
    )
    await files.edit(edited)
    await files.edit(FileEditAction(**ENVELOPE, command="undo_edit", path="notes/deep/a.txt"))
    assert await sandbox.read_bytes("notes/deep/a.txt") == b"hi\n"


@pytest.mark.parametrize(
    "path", ["../escape/new/a.txt", "/etc/taskbus-new/a.txt", "new/../../escape/a.txt"]
)
async def test_editor_create_makes_no_directory_outside_the_workspace(
    sandbox: Sandbox, path: str
) -> None:
    files = files_of(sandbox)
    with pytest.raises(ActionError) as refused:
        await files.edit(FileEditAction(**ENVELOPE, command="create", path=path, file_text="x"))
    assert refused.value.code == "path_outside_workspace"
    assert not await sandbox.exists("new")


async def test_editor_create_does_not_follow_a_link_out_of_the_workspace(
    sandbox: Sandbox,
) -> None:
    await shell(sandbox, "ln -s /tmp tmp-link")
    with pytest.raises(ActionError) as refused:
        await files_of(sandbox).edit(
            FileEditAction(
                **ENVELOPE, command="create", path="tmp-link/taskbus-new/a.txt", file_text="x"
            )
        )
    assert refused.value.code == "path_outside_workspace"


async def test_view_of_a_directory_lists_it(sandbox: Sandbox) -> None:
    await sandbox.write_bytes("pkg/mod.py", b"")
    await sandbox.write_bytes("pkg/deep/er/x.py", b"")
    await sandbox.write_bytes(".hidden", b"")
    listing = await files_of(sandbox).edit(FileEditAction(**ENVELOPE, command="view", path="."))
    assert "pkg/mod.py" in listing.content
    assert "pkg/deep/" in listing.content
    assert "x.py" not in listing.content and ".hidden" not in listing.content


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "a/../../escape.txt"])
async def test_paths_outside_the_workspace_are_refused(sandbox: Sandbox, path: str) -> None:
    files = files_of(sandbox)
    for action in (
        FileReadAction(**ENVELOPE, path=path),
        FileWriteAction(**ENVELOPE, path=path, content="x"),
    ):
        with pytest.raises(ActionError) as refused:
            await (
                files.read(action) if isinstance(action, FileReadAction) else files.write(action)
            )
        assert refused.value.code == "path_outside_workspace"


async def shell(sandbox: Sandbox, command: str) -> None:
    async def ignore(_: str) -> None:
        pass

    outcome = await sandbox.run_command(CommandRequest(command=command), ignore)
    assert outcome.exit_code == 0, outcome.content


@pytest.mark.parametrize(
    "link", ["ln -s /etc etc-link", "mkdir -p a && ln -s ../../../../../../etc a/etc-link"]
)
async def test_symlinks_cannot_lead_out_of_the_workspace(sandbox: Sandbox, link: str) -> None:
    await shell(sandbox, link)
    path = link.split()[-1] + "/passwd"
    for attempt in (sandbox.read_bytes(path), sandbox.write_bytes(path, b"x")):
        with pytest.raises(ActionError) as refused:
            await attempt
        assert refused.value.code == "path_outside_workspace"


async def test_symlinks_inside_the_workspace_are_followed_as_the_sandbox_sees_them(
    sandbox: Sandbox,
) -> None:
    """An absolute link target is a path in the sandbox (`/workspace/...` in a container)."""
    await shell(sandbox, 'mkdir real && ln -s "$PWD/real" absolute && ln -s real relative')
    await sandbox.write_bytes("absolute/via-absolute.txt", b"1")
    await sandbox.write_bytes("relative/sub/via-relative.txt", b"2")
    assert await sandbox.read_bytes("real/via-absolute.txt") == b"1"
    assert await sandbox.read_bytes("real/sub/via-relative.txt") == b"2"
    assert sandbox.resolve("absolute/x") == f"{sandbox.workspace}/real/x"
