"""The text protocol spoken with a persistent interactive `bash` over its stdin and stdout.

Every line sent is one complete command (`eval $'...'`), so bash parses it whole before running
it and whatever the command reads from stdin afterwards is input for the command, not shell
code. After each line, bash's PROMPT_COMMAND prints a marker carrying a per-shell random nonce,
the id of the line, `$?` and `$PWD`. The marker is produced by `printf` from a format string, so
neither the command text nor an echo of it can ever contain the marker itself. An interrupted
line (SIGINT) still ends with a marker, because an interactive bash prompts again.

Nothing here does I/O; the same protocol drives a local process or a `docker exec` socket.
"""

from __future__ import annotations

import re
import secrets

import msgspec

# Keep a held-back partial marker at most this long before treating it as plain output.
_MAX_MARKER_BYTES = 8192
_READY_ID = "ready"


def bash_quote(text: str) -> str:
    """Quote `text` as one bash word on a single line (ANSI-C `$'...'` quoting)."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char == "'":
            out.append("\\'")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "$'" + "".join(out) + "'"


class Marker(msgspec.Struct, frozen=True):
    """End of one line: the id it was sent with, its exit status and the shell's cwd after it."""

    line_id: str
    exit_code: int
    cwd: str


class ShellProtocol:
    """Builds the lines to send and recognises the markers of one shell instance."""

    def __init__(self, nonce: str | None = None) -> None:
        self.nonce = nonce or secrets.token_hex(8)
        self._prefix = f"\n__tb_{self.nonce} ".encode()
        self._pattern = re.compile(rb"__tb_" + self.nonce.encode() + rb" (\w*) (\d+) ([^\n]*)")

    def init_line(self) -> bytes:
        """First line sent: quiets the prompts and installs the marker; its marker says `ready`."""
        prompt_command = (
            f'printf \'\\n__tb_{self.nonce} %s %s %s\\n\' "${{__tb_id-}}" "$?" "$PWD"; __tb_id='
        )
        parts = [
            "set +H",  # no history expansion: `!` in commands stays literal
            "unset HISTFILE",
            "PS1='' PS2='' PS0=''",
            f"PROMPT_COMMAND={bash_quote(prompt_command)}",
        ]
        parts.append(f"__tb_id={_READY_ID}")
        return ("; ".join(parts) + "\n").encode()

    @staticmethod
    def is_ready(marker: Marker) -> bool:
        return marker.line_id == _READY_ID

    @staticmethod
    def command_line(line_id: int, command: str, cwd: str | None = None) -> bytes:
        """One line running `command` in the shell itself, so cwd and env persist."""
        run = f"eval {bash_quote(command)}"
        if cwd:
            run = f"cd -- {bash_quote(cwd)} && {run}"
        return f"__tb_id={line_id}; {run}\n".encode()

    def parser(self) -> MarkerParser:
        return MarkerParser(self._prefix, self._pattern)


class MarkerParser:
    """Splits a byte stream into output and markers; markers may arrive split across reads."""

    def __init__(self, prefix: bytes, pattern: re.Pattern[bytes]) -> None:
        self._prefix = prefix
        self._pattern = pattern
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes | Marker]:
        buffer = self._pending + data
        items: list[bytes | Marker] = []
        while True:
            start = buffer.find(self._prefix)
            if start < 0:
                break
            end = buffer.find(b"\n", start + 1)
            if end < 0:
                if len(buffer) - start > _MAX_MARKER_BYTES:
                    start = len(buffer)  # not a marker after all: release it as output
                items.append(buffer[:start])
                buffer = buffer[start:]
                self._pending = buffer
                return [item for item in items if item != b""]
            match = self._pattern.fullmatch(buffer, start + 1, end)
            if match is None:
                items.append(buffer[: end + 1])
            else:
                items.append(buffer[:start])
                line_id, status, cwd = match.groups()
                items.append(Marker(line_id.decode(), int(status), cwd.decode(errors="replace")))
            buffer = buffer[end + 1 :]
        keep = _longest_prefix_suffix(buffer, self._prefix)
        items.append(buffer[: len(buffer) - keep])
        self._pending = buffer[len(buffer) - keep :]
        return [item for item in items if item != b""]


def _longest_prefix_suffix(buffer: bytes, prefix: bytes) -> int:
    """Length of the longest end of `buffer` that is a proper beginning of `prefix`."""
    for size in range(min(len(prefix) - 1, len(buffer)), 0, -1):
        if buffer.endswith(prefix[:size]):
            return size
    return 0
