"""The pure editor: str_replace, insert, undo history, views, diffs, binary detection."""

from __future__ import annotations

import pytest

from taskbus.runtime_runner import editing

TEXT = "def f():\n    return 1\n\ndef g():\n    return 2\n"


def test_str_replace_replaces_the_unique_occurrence() -> None:
    edit = editing.str_replace(TEXT, "return 2", "return 3")
    assert edit.text == TEXT.replace("return 2", "return 3")
    assert (edit.first_line, edit.last_line) == (5, 5)


def test_str_replace_refuses_a_missing_string() -> None:
    with pytest.raises(editing.EditError, match="did not appear verbatim"):
        editing.str_replace(TEXT, "return 9", "x")


def test_str_replace_refuses_several_occurrences_and_names_their_lines() -> None:
    with pytest.raises(editing.EditError, match=r"Multiple occurrences .* lines \[2, 5\]"):
        editing.str_replace(TEXT, "    return", "    yield")


def test_str_replace_refuses_an_empty_old_string() -> None:
    with pytest.raises(editing.EditError, match="must not be empty"):
        editing.str_replace(TEXT, "", "x")


def test_multi_line_replacement_reports_its_span() -> None:
    edit = editing.str_replace(TEXT, "def g():\n", "def g():\n    '''doc'''\n")
    assert (edit.first_line, edit.last_line) == (4, 5)
    assert "    '''doc'''\n    return 2" in edit.text


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (0, "x\na\nb\n"),
        (1, "a\nx\nb\n"),
        (2, "a\nb\nx\n"),
    ],
)
def test_insert_after_a_line(after: int, expected: str) -> None:
    assert editing.insert("a\nb\n", after, "x").text == expected


def test_insert_into_an_empty_file_and_out_of_range() -> None:
    assert editing.insert("", 0, "first").text == "first\n"
    with pytest.raises(editing.EditError, match=r"outside the valid range 0\.\.2"):
        editing.insert("a\nb\n", 3, "x")


def test_unified_diff_shows_the_change() -> None:
    diff = editing.unified_diff("src/m.py", TEXT, TEXT.replace("return 1", "return 10"))
    assert diff.startswith("--- a/src/m.py\n+++ b/src/m.py\n")
    assert "-    return 1\n+    return 10\n" in diff
    assert editing.unified_diff("m.py", TEXT, TEXT) == ""


def test_history_undoes_edits_in_reverse_order_per_file() -> None:
    history = editing.EditHistory(depth=2)
    history.record("a", "v1")
    history.record("a", "v2")
    history.record("a", "v3")  # v1 falls out of the bounded history
    history.record("b", "other")
    assert history.undo("a") == "v3"
    assert history.undo("a") == "v2"
    with pytest.raises(editing.EditError, match="No edit history"):
        history.undo("a")
    assert history.undo("b") == "other"


def test_view_numbers_lines_and_honours_the_range() -> None:
    assert editing.view("a\nb\nc\n") == "     1\ta\n     2\tb\n     3\tc"
    assert editing.view("a\nb\nc\n", [2, -1]) == "     2\tb\n     3\tc"
    assert editing.view("a\nb\nc\n", [2, 2]) == "     2\tb"
    with pytest.raises(editing.EditError, match="outside the file"):
        editing.view("a\n", [5, 6])
    with pytest.raises(editing.EditError, match="before its first line"):
        editing.view("a\nb\n", [2, 1])


def test_snippet_shows_context_around_the_edit() -> None:
    text = "\n".join(f"line {n}" for n in range(1, 21))
    lines = editing.snippet(text, 10, 10).splitlines()
    assert lines[0] == "     6\tline 6"
    assert lines[-1] == "    14\tline 14"


@pytest.mark.parametrize(
    ("data", "binary"),
    [
        (b"plain text\n", False),
        ("naïve ünïcode".encode(), False),
        (b"\x89PNG\r\n\x1a\n\x00\x00", True),
        (b"\xff\xfe\xfa garbage", True),
        (b"a" * 8191 + "é".encode(), False),  # a character cut by the sniffing window
        (b"", False),
    ],
)
def test_binary_detection(data: bytes, binary: bool) -> None:
    assert editing.is_binary(data) is binary
