"""The shell protocol's pure parts: quoting and marker recognition across arbitrary reads."""

from __future__ import annotations

import subprocess

import pytest

from taskbus.runtime_runner.shell_protocol import Marker, ShellProtocol, bash_quote


@pytest.mark.parametrize(
    "text",
    ["plain", "it's", "back\\slash", "two\nlines\n", "tab\there", '$HOME `x` "q"', "\x01\x7f"],
)
def test_bash_quote_round_trips_through_bash_on_one_line(text: str) -> None:
    quoted = bash_quote(text)
    assert "\n" not in quoted
    printed = subprocess.run(
        ["bash", "-c", f"printf %s {quoted}"], capture_output=True, check=True
    ).stdout
    assert printed == text.encode()


def _parse(protocol: ShellProtocol, stream: bytes, cut: int) -> list[bytes | Marker]:
    """Feed in pieces of `cut` bytes and merge adjacent output, as a consumer would see it."""
    parser = protocol.parser()
    merged: list[bytes | Marker] = []
    for start in range(0, len(stream), cut):
        for item in parser.feed(stream[start : start + cut]):
            if isinstance(item, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += item
            else:
                merged.append(item)
    return merged


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64, 10_000])
def test_markers_are_found_however_the_stream_is_cut(cut: int) -> None:
    protocol = ShellProtocol(nonce="abc123")
    stream = (
        b"hello\n"
        b"\n__tb_abc123 7 0 /work/dir with space\n"
        b"__tb_abc123 lookalike without the newline before it\n"
        b"\n__tb_wrongnonce 8 0 /x\n"
        b"partial\n__tb_abc12"
        b"\n__tb_abc123 8 130 /tmp\n"
    )
    assert _parse(protocol, stream, cut) == [
        b"hello\n",
        Marker("7", 0, "/work/dir with space"),
        b"__tb_abc123 lookalike without the newline before it\n"
        b"\n__tb_wrongnonce 8 0 /x\npartial\n__tb_abc12",
        Marker("8", 130, "/tmp"),
    ]


def test_output_that_only_looks_like_a_marker_start_is_released() -> None:
    protocol = ShellProtocol(nonce="abc123")
    parser = protocol.parser()
    assert parser.feed(b"x\n__tb_ab") == [b"x"]  # held back: might be a marker
    assert parser.feed(b"zz\n") == [b"\n__tb_abzz"]  # the last newline might start one too
    runaway = b"\n__tb_abc123 " + b"y" * 10_000
    released = b"".join(i for i in parser.feed(runaway) if isinstance(i, bytes))
    assert released == b"\n" + runaway


def test_command_line_is_one_line_that_cannot_contain_the_marker() -> None:
    protocol = ShellProtocol()
    line = protocol.command_line(3, "echo 'a'\necho b", cwd="/tmp/x y")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.nonce.encode() not in line
    assert protocol.nonce.encode() in protocol.init_line()
