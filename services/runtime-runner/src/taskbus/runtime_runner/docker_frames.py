"""Pure: the payload of Docker's multiplexed attach/exec stream (tty off).

Each frame is an 8-byte header (stream type, three zero bytes, big-endian payload size) and the
payload. The shell merges its stderr into stdout itself, so stream types are not told apart.
"""

from __future__ import annotations

_HEADER_BYTES = 8


class FrameDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> bytes:
        """The payload bytes completed by `data`; a partial frame waits for the next call."""
        self._buffer += data
        payload = bytearray()
        offset = 0
        while len(self._buffer) - offset >= _HEADER_BYTES:
            size = int.from_bytes(self._buffer[offset + 4 : offset + _HEADER_BYTES], "big")
            end = offset + _HEADER_BYTES + size
            if end > len(self._buffer):
                break
            payload += self._buffer[offset + _HEADER_BYTES : end]
            offset = end
        del self._buffer[:offset]
        return bytes(payload)
