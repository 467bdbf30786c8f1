"""Bounded capture of command output: the head and the tail are kept, the middle is counted."""

from __future__ import annotations


class OutputCap:
    """Keeps at most `limit` bytes (half head, half tail) of an output of any size."""

    def __init__(self, limit: int) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0

    def append(self, data: bytes) -> None:
        self._total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        # Trim lazily (at twice the limit) so a stream of small appends stays linear.
        if len(self._tail) > 2 * self._tail_limit:
            del self._tail[: len(self._tail) - self._tail_limit]

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def truncated_bytes(self) -> int:
        return self._total - len(self._head) - min(len(self._tail), self._tail_limit)

    def __bool__(self) -> bool:
        return self._total > 0

    def text(self) -> str:
        """The kept output as text, with a note saying how many bytes were dropped, if any."""
        tail = bytes(self._tail[-self._tail_limit :])
        dropped = self.truncated_bytes
        if not dropped:
            return (bytes(self._head) + tail).decode(errors="replace")
        note = f"\n[... {dropped} bytes of output omitted ...]\n"
        return self._head.decode(errors="replace") + note + tail.decode(errors="replace")
