"""Pure: the payload of Docker's multiplexed attach/exec stream (tty off).

Each frame is an 8-byte header (stream type, three zero bytes, big-endian payload size) and the
payload. The shell merges its stderr into stdout itself, so `feed` does not tell stream types apart;
`frames` does, for programs whose stdout is a protocol (MCP servers).
"""

from __future__ import annotations

_HEADER_BYTES = 8


class FrameDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> bytes:
        """The payload bytes completed by `data`; a partial frame waits for the next call."""
        return b"".join(payload for _, payload in self.frames(data))

    def frames(self, data: bytes) -> list[tuple[int, bytes]]:
        """The (stream type: 1 stdout, 2 stderr, payload) frames completed by `data`."""
        self._buffer += data
        frames = []
        offset = 0
        while len(self._buffer) - offset >= _HEADER_BYTES:
            size = int.from_bytes(self._buffer[offset + 4 : offset + _HEADER_BYTES], "big")
            end = offset + _HEADER_BYTES + size
            if end > len(self._buffer):
                break
            frames.append((self._buffer[offset], bytes(self._buffer[offset + _HEADER_BYTES : end])))
            offset = end
        del self._buffer[:offset]
        return frames
